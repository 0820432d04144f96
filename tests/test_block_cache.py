"""The block cache (``blocks``: faithful, ``prefix+blocks``: shared prefix) against its contracts.

- With the cache just computed from the same tokens, a block-only forward gives the full
  forward's logits on the block, for any mix of refreshing and mid-block rows.
- The engine picks the tokens of a slow, obviously-correct oracle of Fast-dLLM's DualCache
  written here from its description: one row, no padding, no pages; at a block's first step
  a full forward whose K/V are kept; at its other steps a full forward whose K/V outside the
  block are replaced by the kept ones (so only the block's own K/V are fresh).
- A row's tokens do not depend on its neighbours; rows that do not fit the pages wait; every
  page comes back; threshold, fixed steps, early stop, n > 1 and temperature > 0 work;
  classifier-free guidance is refused.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from illada_batch.decoding.loop import FullForward
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.block_cache import BlockCacheForward
from illada_batch.engine.cache_plan import BlockCache, encode_isolated
from illada_batch.engine.diffusion import Engine, Request
from illada_batch.engine.kv_cache import KVCache, bytes_per_page
from illada_batch.engine.pages import PagePool
from illada_batch.model.layers.traffic import Traffic, counting

MODES = ["blocks", "prefix+blocks"]
PAGE = 16


@pytest.fixture(scope="module")
def model(make_tiny_llada):
    return make_tiny_llada(seed=5)


@pytest.fixture(scope="module")
def eos_model(make_tiny_llada):
    m = make_tiny_llada(seed=6)
    with torch.no_grad():
        m.model.transformer.ff_out.weight[m.config.eos_token_id] *= 2.5  # some rows end early
    return m


def ordinary_limit(model) -> int:
    """Ordinary ids are 3 .. below this: the mask id where it ends the vocabulary (the tiny
    LLaDA fixtures), else the vocabulary (the tiny family checkpoints: mask id 2)."""
    card = model.card
    return card.mask_token_id if card.mask_token_id > 3 else card.vocab_size


def toks(rng: random.Random, n: int, model) -> tuple[int, ...]:
    return tuple(rng.randrange(3, ordinary_limit(model)) for _ in range(n))


def assert_same(got, want):
    assert [(r.request_id, r.sample_index, r.token_ids, r.steps, r.finish_reason) for r in got] == \
           [(r.request_id, r.sample_index, r.token_ids, r.steps, r.finish_reason) for r in want]


# ------------------------------------------------------------------ 1. block-only == full forward


def _batch_mid_decode(model, mode: str, seed: int):
    """A batch of 6 rows of different lengths, each in some block with some of it unmasked."""
    rng = random.Random(seed)
    params = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8)
    prefix = toks(rng, 21, model)
    shared = encode_isolated(model, prefix) if mode == "prefix+blocks" else None
    pool = PagePool(64, PAGE)
    kv = KVCache(model.card, 64, PAGE, model.device, model.dtype)
    plan = BlockCache(prefix, shared, None, pool, kv)
    queue = deque((i, Request(f"r{i}", toks(rng, rng.randrange(1, 30), model), prefix, params)) for i in range(6))
    batch = plan.new_rows(plan.take(queue, 6, params), params, model)
    G, BL, L = 32, 8, batch.x.shape[1]
    for r in range(6):  # earlier blocks filled, the current one partly
        b = rng.randrange(4)
        batch.block[r] = b
        batch.x[r, L - G:L - G + b * BL] = torch.tensor(toks(rng, b * BL, model))
        for c in rng.sample(range(BL), rng.randrange(BL)):
            batch.x[r, L - G + b * BL + c] = rng.randrange(3, ordinary_limit(model))
    cols = (L - G) + batch.block[:, None] * BL + torch.arange(BL)  # [6, BL]
    return batch, params, plan, shared, cols


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("light", [(), (0, 1, 2, 3, 4, 5), (1, 4), (0, 2, 3, 5)], ids=["all-refresh", "all-block",
                                                                                       "mixed-2", "mixed-4"])
def test_block_only_forward_equals_the_full_forward(model, mode, light):
    batch, params, plan, shared, cols = _batch_mid_decode(model, mode, seed=len(light))
    rows = torch.arange(6)
    with torch.no_grad():
        full = FullForward(prefix_kv=shared).block_logits(model, batch, rows, cols, params)  # [6, BL, V]
        batch.step[:] = 0
        refreshed = plan.forward.block_logits(model, batch, rows, cols, params)  # writes every row's K/V
        batch.step[list(light)] = 1
        mixed = plan.forward.block_logits(model, batch, rows, cols, params)
    torch.testing.assert_close(refreshed, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed, full, rtol=1e-4, atol=1e-4)
    if light:  # the block-only rows really read the cache: a stale one changes their logits
        r = light[0]
        batch.x[r, batch.valid[r].nonzero()[0, 0]] = 3 if int(batch.x[r, batch.valid[r].nonzero()[0, 0]]) != 3 else 4
        with torch.no_grad():
            stale = plan.forward.block_logits(model, batch, rows, cols, params)
            now = FullForward(prefix_kv=shared).block_logits(model, batch, rows, cols, params)
        assert torch.equal(stale[r], mixed[r]) and not torch.allclose(now[r], mixed[r], atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_a_block_only_step_copies_no_row_cache(model, mode):
    """The block's fresh K/V go into the row's pages and attention reads them there: no
    K/V is gathered, concatenated, scattered or repeated (a copy of a row's cache would be).
    With a logit shift (Dream) the positions just before the block run and are written too."""
    batch, params, plan, shared, cols = _batch_mid_decode(model, mode, seed=7)
    rows, layers = torch.arange(6), model.card.n_layers
    run = params.block_length + model.card.logit_shift  # query positions per row
    with torch.no_grad():
        plan.forward.block_logits(model, batch, rows, cols, params)  # refresh: every row's K/V into pages
        batch.step[:] = 1
        with counting(Traffic()) as traffic:
            plan.forward.block_logits(model, batch, rows, cols, params)
    step = traffic.current
    assert dict(step.copied) == {}
    assert step.kv_written == 6 * run * layers  # only the block's own K/V
    assert step.kv_read >= int(batch.valid.sum()) * layers and step.query_tokens == 6 * run


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_paged_attention_logits_equal_the_gathered_path_for_any_batch_mix(model, data):
    """Rows of any lengths and blocks, any of them refreshing, any subset of the batch, pages
    anywhere in the pool (a permuted pool: rows of one or many runs of pages): the paged
    block-only step gives the gathered path's logits (within fp32 rounding of a different
    summation order: runs merged by log-sum-exp), and copies nothing."""
    mode = data.draw(st.sampled_from(MODES))
    batch, params, plan, shared, cols = _batch_mid_decode(model, mode, seed=data.draw(st.integers(0, 2**16)))
    batch.page_table = torch.tensor(data.draw(st.permutations(range(64))))[batch.page_table]
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, 5), min_size=1))))
    light = data.draw(st.lists(st.booleans(), min_size=6, max_size=6))
    gathered = BlockCacheForward(plan.forward.kv, shared, paged=False)
    with torch.no_grad():
        batch.step[:] = 0
        plan.forward.block_logits(model, batch, torch.arange(6), cols, params)  # every row's K/V into pages
        batch.step[:] = torch.tensor(light, dtype=torch.long)
        want = gathered.block_logits(model, batch, rows, cols[rows], params)
        with counting(Traffic()) as traffic:
            got = plan.forward.block_logits(model, batch, rows, cols[rows], params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "gather" not in traffic.current.copied and "scatter" not in traffic.current.copied


# ------------------------------------------------------------------ 2. the DualCache oracle


def dual_cache_oracle(model, prefix, prompt, params: SamplingParams, shared: bool) -> list[int]:
    """One row, temperature 0, low-confidence remasking (fixed schedule or threshold)."""
    mask, G, BL = model.card.mask_token_id, params.gen_length, params.block_length
    prefix_kv = encode_isolated(model, prefix) if shared and prefix else None
    seq = list(prompt) if shared else list(prefix) + list(prompt)
    ids, S = seq + [mask] * G, len(seq)
    positions = torch.arange(len(ids)) + (len(prefix) if shared else 0)
    for b in range(params.num_blocks):
        lo, hi = S + b * BL, S + (b + 1) * BL
        kept: list = []
        for k in range(BL):
            if mask not in ids[lo:hi]:
                break

            def hook(layer, key, value, k=k):
                if k == 0:
                    kept.append((key, value))
                    return key, value
                old_k, old_v = kept[layer][0].clone(), kept[layer][1].clone()
                old_k[:, :, lo:hi], old_v[:, :, lo:hi] = key[:, :, lo:hi], value[:, :, lo:hi]
                return old_k, old_v

            with torch.no_grad():
                logits = model.run(torch.tensor([ids]), positions=positions[None], prefix_kv=prefix_kv,
                                   kv_hook=hook).logits[0, lo:hi].double()  # [BL, V]
            probs = torch.softmax(logits, -1)
            logits[:, mask] = -torch.inf
            cands = sorted(((float(probs[i, int(logits[i].argmax())]), lo + i, int(logits[i].argmax()))
                            for i in range(BL) if ids[lo + i] == mask), key=lambda c: -c[0])
            if params.threshold is None:
                M, s = BL, params.steps_per_block
                n = M // s + (k < M % s)
            else:
                n = max(1, sum(c[0] >= params.threshold for c in cands))
            for _, i, t in cands[:n]:
                ids[i] = t
    return ids[S:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("params", [SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8),
                                    SamplingParams(early_stop=False, steps=32, gen_length=32, block_length=16, threshold=0.3)],
                         ids=["fixed-4-blocks", "threshold"])
def test_engine_matches_the_dual_cache_oracle(model, mode, params):
    rng = random.Random(11)
    prefix = toks(rng, 24, model)
    reqs = [Request(f"o{i}", toks(rng, rng.randrange(1, 30), model), prefix, params) for i in range(7)]
    engine = Engine(model, cache=mode, max_batch_size=3)
    got = engine.run(reqs)
    eos = model.card.eos_token_id
    for req, res in zip(reqs, got):
        want = dual_cache_oracle(model, prefix, req.prompt_ids, params, shared=mode == "prefix+blocks")
        assert res.token_ids == (want[:want.index(eos)] if eos in want else want), req.request_id
    assert len({tuple(r.token_ids) for r in got}) == 7
    off = Engine(model, cache="off", max_batch_size=3).run(reqs)
    assert any(a.token_ids != b.token_ids for a, b in zip(got, off)), "the cache must be an approximation here"
    engine.pool.check_invariants()
    assert engine.pool.num_free_pages == engine.pool.num_pages


# ------------------------------------------------------------------ 3. batching, pages, settings


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", MODES)
def test_row_tokens_do_not_depend_on_batch_neighbours(model, mode, temperature):
    rng = random.Random(2)
    prefix = toks(rng, 30, model)
    params = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8, temperature=temperature)
    reqs = [Request(f"b{i}", toks(rng, rng.randrange(1, 40), model), prefix, params, sample_index=i % 3, seed=11)
            for i in range(12)]
    together = Engine(model, cache=mode, max_batch_size=12).run(reqs)
    alone = [Engine(model, cache=mode, max_batch_size=1).run([r])[0] for r in reqs]
    order = list(reversed(range(12)))
    mixed = Engine(model, cache=mode, max_batch_size=5).run([reqs[i] for i in order])
    assert_same(together, alone)
    assert_same([mixed[order.index(i)] for i in range(12)], alone)


@pytest.mark.parametrize("mode", MODES)
def test_rows_that_do_not_fit_wait_and_every_page_comes_back(model, mode, monkeypatch):
    rng = random.Random(3)
    prefix = toks(rng, 20, model)
    params = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8, threshold=0.5)
    reqs = [Request(f"w{i}", toks(rng, rng.randrange(1, 12), model), prefix, params) for i in range(10)]
    roomy = Engine(model, cache=mode, max_batch_size=8).run(reqs)
    # 16 pages: one row of the model's 256 tokens; rows of 3-4 pages: 4-5 fit at once
    tight = Engine(model, cache=mode, max_batch_size=8, kv_budget=16 * bytes_per_page(model.card, PAGE, model.dtype))
    sizes = []
    real = model.run
    monkeypatch.setattr(model, "run", lambda ids, *a, **k: sizes.append(ids.shape[0]) or real(ids, *a, **k))
    got = tight.run(reqs)
    monkeypatch.undo()
    assert_same(got, roomy)
    assert tight.counters.row_waits > 0 and max(sizes) < 8
    tight.pool.check_invariants()
    assert tight.pool.num_free_pages == tight.pool.num_pages
    with pytest.raises(ValueError, match="kv_budget"):
        Engine(model, cache=mode, kv_budget=15 * bytes_per_page(model.card, PAGE, model.dtype))


@pytest.mark.parametrize("mode", MODES)
def test_fixed_steps_threshold_early_stop_and_samples(eos_model, mode):
    rng = random.Random(4)
    prefix = toks(rng, 20, eos_model)
    prompts = [toks(rng, rng.randrange(2, 20), eos_model) for _ in range(6)]
    engine = Engine(eos_model, cache=mode, max_batch_size=4)

    def run(params, n=1, seed=0):
        return engine.run([Request(f"s{i}", p, prefix, params, j, seed) for i, p in enumerate(prompts) for j in range(n)])

    fixed = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8)
    assert all(r.steps == 16 for r in run(fixed))
    thresh = run(SamplingParams(early_stop=False, steps=32, gen_length=32, block_length=8, threshold=0.5))
    assert all(r.steps <= 32 for r in thresh) and len({r.steps for r in thresh}) > 1
    stop = run(SamplingParams(steps=16, gen_length=32, block_length=8, early_stop=True))
    assert any(r.finish_reason == "eos" and r.steps < 16 for r in stop)
    hot = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8, temperature=1.0)
    samples = run(hot, n=3, seed=9)
    assert len({tuple(r.token_ids) for r in samples}) == 18
    assert_same(run(hot, n=3, seed=9), samples)
    assert all(eos_model.config.mask_token_id not in r.token_ids for r in samples + stop + thresh)
    engine.pool.check_invariants()
    assert engine.pool.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("mode", MODES)
def test_classifier_free_guidance_is_refused(model, mode):
    params = SamplingParams(early_stop=False, steps=8, gen_length=16, block_length=8, cfg_scale=1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        Engine(model, cache=mode).run([Request("c", (5, 6, 7), (), params)])


def test_every_cache_mode_has_a_name_the_cli_and_spec_accept():
    from illada_batch.cli import _cache_modes
    from illada_batch.job.spec import EngineSpec

    assert [EngineSpec(cache=m.value).cache for m in CacheMode] == list(CacheMode)
    assert _cache_modes() == ["off", "prefix", "blocks", "prefix+blocks"]


def test_a_shared_prefix_that_leaves_no_room_for_a_row_is_encoded_for_the_group(model):
    rng = random.Random(5)
    prefix = toks(rng, 210, model)  # 14 pages of the 16: no room left for a 3-page row
    params = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8)
    reqs = [Request(f"f{i}", toks(rng, rng.randrange(2, 12), model), prefix, params) for i in range(4)]
    roomy = Engine(model, cache="prefix+blocks")
    tight = Engine(model, cache="prefix+blocks", kv_budget=16 * bytes_per_page(model.card, PAGE, model.dtype))
    assert_same(tight.run(reqs), roomy.run(reqs))
    assert (tight.counters.prefix_fallbacks, roomy.counters.prefix_fallbacks) == (1, 0)
    tight.pool.check_invariants()
    assert tight.pool.num_free_pages == tight.pool.num_pages
