"""Tests for the batched engine: cache modes, continuous batching, prefix pages, budgets,
bad requests, per-sample seeds, and the paged K/V tensors.

Every model here is tiny (d_model 64, 2 layers, vocab 256), random and float32 on CPU. The
attention projections are scaled up so that a row's tokens depend strongly on its context
(with a plain random init every masked position predicts the same token, and most cache
or position bugs would go unseen); the output head has std 0.5 (no argmax ties) and a zero
row for the mask token. ``EOS_MODEL`` also scales the EOS row of the head so that some rows
emit EOS early and others run to the full length.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine, Request, Result, sample_seed
from illada_batch.engine.kv_cache import KVCache, bytes_per_page, pages_for_budget
from illada_batch.model.configs.llada import PRESETS, card
from illada_batch.model.llada import LLaDA

PAGE = 16
G32 = SamplingParams(steps=16, gen_length=32, block_length=16)  # fixed schedule, 2 blocks


@pytest.fixture(scope="module")
def model(make_tiny_llada) -> LLaDA:
    return make_tiny_llada(recipe="sharp")


@pytest.fixture(scope="module")
def eos_model(make_tiny_llada) -> LLaDA:
    return make_tiny_llada(recipe="sharp", eos_scale=2.5)


def bpp(model: LLaDA) -> int:
    return bytes_per_page(model.card, PAGE, model.dtype)


def toks(rng: random.Random, n: int) -> tuple[int, ...]:
    """Ordinary token ids (never pad/EOS 1 or mask 2)."""
    return tuple(rng.randrange(3, 256) for _ in range(n))


def prefix_engine(model: LLaDA, pages: int = 32, **kw) -> Engine:
    return Engine(model, cache="prefix", kv_budget=pages * bpp(model), **kw)


def off_engine(model: LLaDA, **kw) -> Engine:
    """The block-causal reference: a prefix engine without pages runs every group with the
    cache off and the prefix attending only to itself (what the prefix cache computes)."""
    return Engine(model, cache="prefix", kv_budget=0, **kw)


def assert_same_outputs(got: list[Result], want: list[Result]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.request_id, g.sample_index) == (w.request_id, w.sample_index)
        assert g.token_ids == w.token_ids, f"{g.request_id}/{g.sample_index}: tokens differ"
        assert (g.finish_reason, g.steps) == (w.finish_reason, w.steps), f"{g.request_id}/{g.sample_index}"


def assert_pool_clean(engine: Engine) -> None:
    pool = engine.pool
    pool.check_invariants()
    assert pool.num_free_pages == pool.num_pages
    assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))


def record_forwards(monkeypatch, model: LLaDA) -> list[dict]:
    """Wrap ``model.run`` to log (batch size, length, prefix-encode?) of every forward."""
    calls: list[dict] = []
    real = model.run

    def run(input_ids, *args, **kwargs):
        calls.append(dict(batch=input_ids.shape[0], length=input_ids.shape[1],
                          encode=kwargs.get("return_logits", True) is False))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "run", run)
    return calls


# ------------------------------------------------------------------ 1. prefix == off (block-causal)

PARAM_SETS = {
    "fixed-2-blocks": SamplingParams(steps=16, gen_length=32, block_length=16),
    "threshold": SamplingParams(steps=16, gen_length=32, block_length=16, threshold=0.5),
    "temperature-0.7": SamplingParams(steps=16, gen_length=32, block_length=16, temperature=0.7),
    "early-stop": SamplingParams(steps=16, gen_length=32, block_length=16, early_stop=True),
}


@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_prefix_cache_gives_the_same_tokens_as_block_causal_off(name, model, eos_model):
    params = PARAM_SETS[name]
    m = eos_model if name == "early-stop" else model
    rng = random.Random(1)
    prefix = toks(rng, 50)
    reqs = [Request(f"q{i}", toks(rng, rng.randrange(1, 40)), prefix, params, sample_index=i % 2, seed=7 + i)
            for i in range(22)]
    cached = prefix_engine(m, max_batch_size=8)
    got = cached.run(reqs)
    want = off_engine(m, max_batch_size=8).run(reqs)
    assert_same_outputs(got, want)
    assert cached.counters.prefix_fallbacks == 0 and cached.counters.prefix_pages_missed == 3
    assert all(r.finish_reason in ("eos", "length") for r in got)
    assert len({tuple(r.token_ids) for r in got}) > 15, "outputs too uniform for the comparison to mean anything"
    if name == "early-stop":  # the setting really exercises early stopping
        assert any(r.steps < params.steps for r in got) and any(r.finish_reason == "length" for r in got)
    if name == "threshold":
        assert len({r.steps for r in got}) > 3
    if name == "fixed-2-blocks":  # the comparison is sensitive: a prefix that sees the rows gives other tokens
        bidirectional = Engine(m, cache="off", max_batch_size=8).run(reqs)
        assert sum(a.token_ids != b.token_ids for a, b in zip(bidirectional, got)) > 10


# ------------------------------------------------------------------ 2. batch independence


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("cache", ["prefix", "off"])
def test_row_tokens_do_not_depend_on_batch_neighbours(cache, temperature, model):
    rng = random.Random(2)
    prefix = toks(rng, 40)
    params = SamplingParams(steps=16, gen_length=32, block_length=16, temperature=temperature)
    reqs = [Request(f"b{i}", toks(rng, rng.randrange(1, 48)), prefix, params, sample_index=i % 3, seed=11)
            for i in range(16)]

    def engine(batch: int) -> Engine:
        return prefix_engine(model, max_batch_size=batch) if cache == "prefix" else \
            Engine(model, cache="off", max_batch_size=batch)

    together = engine(16).run(reqs)
    alone = [engine(1).run([r])[0] for r in reqs]
    shuffled_order = list(reversed(range(16)))
    mixed = engine(5).run([reqs[i] for i in shuffled_order])  # other neighbours, refills mid-flight
    assert_same_outputs(together, alone)
    assert_same_outputs([mixed[shuffled_order.index(i)] for i in range(16)], alone)
    assert len({tuple(r.token_ids) for r in together}) == 16


# ------------------------------------------------------------------ 3. continuous batching


def test_continuous_batching_returns_every_request_exactly_once(eos_model, monkeypatch):
    rng = random.Random(3)
    prefixes = [toks(rng, 20), toks(rng, 36)]
    params = [SamplingParams(steps=16, gen_length=32, block_length=16, early_stop=True, temperature=0.5),
              SamplingParams(steps=16, gen_length=32, block_length=16, threshold=0.5)]
    keys = [(f"id{i}", j) for i in range(13) for j in range(3)][:37]
    rng.shuffle(keys)  # request order is neither sorted nor grouped
    reqs = [Request(rid, toks(rng, rng.randrange(1, 30)), prefixes[n % 2], params[(n // 2) % 2], j, seed=5)
            for n, (rid, j) in enumerate(keys)]
    engine = prefix_engine(eos_model, max_batch_size=5)
    calls = record_forwards(monkeypatch, eos_model)
    results = engine.run(reqs)

    assert len(results) == 37
    assert [(r.request_id, r.sample_index) for r in results] == keys
    assert len(set(keys)) == 37
    assert engine.counters.samples == 37
    assert engine.counters.tokens == sum(len(r.token_ids) for r in results)
    assert all(r.finish_reason in ("eos", "length") and r.error is None for r in results)
    # rows really finished at different times, and the early stoppers came back too
    assert len({r.steps for r in results}) >= 4
    assert {"eos", "length"} <= {r.finish_reason for r in results}
    assert any(r.finish_reason == "eos" and r.steps < 16 for r in results)
    # never more than max_batch_size rows in a forward, and a finished row's slot is refilled
    # at once: within a group (each starts with its prefix's tail encode) the batch only
    # shrinks once the group's queue is empty
    assert max(c["batch"] for c in calls) == 5
    groups: list[list[int]] = []
    for c in calls:
        if c["encode"]:
            groups.append([])
        else:
            groups[-1].append(c["batch"])
    assert len(groups) == 4 and sum(map(len, groups)) == engine.counters.forward_passes
    for sizes in groups:
        assert sizes[0] == 5 and all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert_pool_clean(engine)
    monkeypatch.undo()
    # refilling finished slots does not change any row's tokens
    alone = prefix_engine(eos_model, max_batch_size=1).run(reqs)
    assert_same_outputs(results, alone)


# ------------------------------------------------------------------ 4. prefix pages


def test_second_run_hits_every_full_prefix_page(model, monkeypatch):
    rng = random.Random(4)
    prefix = toks(rng, 50)  # 3 full pages + a 2-token partial page
    reqs = [Request(f"p{i}", toks(rng, rng.randrange(1, 20)), prefix, G32) for i in range(6)]
    engine = prefix_engine(model, max_batch_size=4)
    c = engine.counters
    first = engine.run(reqs)
    assert (c.prefix_pages_hit, c.prefix_pages_missed) == (0, 3)
    assert_pool_clean(engine)

    calls = record_forwards(monkeypatch, model)
    second = engine.run(reqs)
    monkeypatch.undo()
    assert (c.prefix_pages_hit, c.prefix_pages_missed) == (len(prefix) // PAGE, 3)
    assert [x["length"] for x in calls if x["encode"]] == [len(prefix) % PAGE]  # only the partial tail
    assert_same_outputs(second, first)
    assert_pool_clean(engine)

    # another prefix sharing the first 32 tokens: LLaDA's prefix is bidirectional, so a page's
    # K/V depend on the whole prefix and none of the first prefix's pages may be reused
    other = prefix[:32] + toks(rng, 18)
    engine.run([dataclasses.replace(r, prefix_ids=other) for r in reqs])
    assert (c.prefix_pages_hit, c.prefix_pages_missed) == (3, 3 + 3)
    assert_pool_clean(engine)
    assert c.prefix_fallbacks == 0


def test_groups_with_one_prefix_share_pages_within_a_run(model):
    rng = random.Random(41)
    prefix = toks(rng, 48)  # exactly 3 pages: nothing to encode once cached
    reqs = [Request(f"g{i}", toks(rng, 5 + i), prefix, p) for i, p in enumerate([G32, PARAM_SETS["threshold"]] * 3)]
    engine = prefix_engine(model)
    got = engine.run(reqs)
    assert (engine.counters.prefix_pages_hit, engine.counters.prefix_pages_missed) == (3, 3)
    assert_same_outputs(got, off_engine(model).run(reqs))
    assert_pool_clean(engine)


def test_evicted_prefix_pages_are_encoded_again_correctly(model):
    rng = random.Random(42)
    a, b = toks(rng, 50), toks(rng, 50)  # 4 pages each, the pool holds 4
    reqs = [Request(f"e{i}", toks(rng, rng.randrange(1, 20)), a, G32) for i in range(5)]
    engine = prefix_engine(model, pages=4)
    want_a = off_engine(model).run(reqs)
    assert_same_outputs(engine.run(reqs), want_a)
    b_reqs = [dataclasses.replace(r, prefix_ids=b) for r in reqs]
    assert_same_outputs(engine.run(b_reqs), off_engine(model).run(b_reqs))  # evicts a's pages
    assert_same_outputs(engine.run(reqs), want_a)
    assert (engine.counters.prefix_pages_hit, engine.counters.prefix_pages_missed) == (0, 9)
    assert engine.counters.prefix_fallbacks == 0
    assert_pool_clean(engine)


@pytest.mark.parametrize("relation", ["shares-32-tokens", "is-a-shorter-prefix", "is-a-longer-prefix"])
def test_tokens_do_not_depend_on_which_prefixes_ran_before(relation, model):
    rng = random.Random(43)
    a = toks(rng, 50)
    other = {"shares-32-tokens": a[:32] + toks(rng, 18), "is-a-shorter-prefix": a[:48],
             "is-a-longer-prefix": a + toks(rng, 20)}[relation]
    reqs = [Request(f"h{i}", toks(rng, rng.randrange(1, 20)), other, G32) for i in range(6)]
    fresh = prefix_engine(model).run(reqs)
    assert_same_outputs(fresh, off_engine(model).run(reqs))
    engine = prefix_engine(model)
    engine.run([dataclasses.replace(r, prefix_ids=a) for r in reqs])
    after = engine.run(reqs)
    # A bidirectional prefix's pages depend on all of it: nothing of `a` may be reused.
    assert engine.counters.prefix_pages_hit == 0
    assert_same_outputs(after, fresh)


# ------------------------------------------------------------------ 5. budget


def test_prefix_over_budget_falls_back_to_off_and_stays_correct(model):
    rng = random.Random(5)
    long_prefix, short_prefix = toks(rng, 50), toks(rng, 10)  # 4 pages, 1 page
    reqs = [Request(f"f{i}", toks(rng, rng.randrange(1, 25)), long_prefix if i % 3 else short_prefix, G32)
            for i in range(9)]
    engine = Engine(model, cache="prefix", kv_budget=bpp(model), max_batch_size=4)
    assert engine.pool.num_pages == 1
    got = engine.run(reqs)
    assert_same_outputs(got, off_engine(model).run(reqs))
    assert engine.counters.prefix_fallbacks == 1  # the long prefix's group only
    assert engine.counters.prefix_pages_missed == 0  # the short prefix is a partial page
    assert_pool_clean(engine)
    again = engine.run(reqs)
    assert_same_outputs(again, got)
    assert engine.counters.prefix_fallbacks == 2


def test_tokens_do_not_depend_on_kv_budget(model):
    rng = random.Random(51)
    prefix = toks(rng, 50)
    reqs = [Request(f"k{i}", toks(rng, rng.randrange(1, 25)), prefix, G32) for i in range(6)]
    roomy = Engine(model, cache="prefix", kv_budget=32 * bpp(model)).run(reqs)
    small = Engine(model, cache="prefix", kv_budget=bpp(model))
    got = small.run(reqs)
    assert small.counters.prefix_fallbacks == 1
    assert_same_outputs(got, roomy)


def test_budget_below_one_page_falls_back_or_names_kv_budget(model):
    rng = random.Random(52)
    reqs = [Request("z", toks(rng, 5), toks(rng, 20), G32)]
    try:
        engine = Engine(model, cache="prefix", kv_budget=bpp(model) - 1)
    except ValueError as exc:
        assert "kv_budget" in str(exc)
        return
    assert_same_outputs(engine.run(reqs), off_engine(model).run(reqs))


# ------------------------------------------------------------------ 6. bad requests


@pytest.mark.parametrize("cache", ["prefix", "off"])
def test_bad_requests_become_error_results_and_the_rest_generate(cache, make_tiny_llada):
    model = make_tiny_llada(recipe="sharp", max_sequence_length=128)
    rng = random.Random(6)
    prefix = toks(rng, 50)
    good = [Request("ok0", toks(rng, 7), prefix, G32), Request("ok1", toks(rng, 20), prefix, G32),
            Request("at-limit", toks(rng, 128 - 50 - 32), prefix, G32),  # exactly max_sequence_length
            Request("prefix-only", (), prefix, G32), Request("no-prefix", toks(rng, 9), (), G32)]
    too_long = Request("too-long", toks(rng, 128 - 50 - 32 + 1), prefix, G32)
    empty = Request("empty", (), (), G32)
    reqs = [good[0], too_long, good[1], empty, *good[2:]]
    engine = prefix_engine(model) if cache == "prefix" else off_engine(model)
    results = engine.run(reqs)

    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    by_id = {r.request_id: r for r in results}
    bad = by_id["too-long"]
    assert bad.finish_reason == "error" and "too long" in bad.error and bad.token_ids == []
    assert by_id["empty"].finish_reason == "error" and by_id["empty"].error and by_id["empty"].token_ids == []
    for r in good:
        assert by_id[r.request_id].finish_reason in ("eos", "length") and by_id[r.request_id].error is None
        assert len(by_id[r.request_id].token_ids) > 0
    assert engine.counters.samples == len(good)
    # the bad requests did not disturb the others
    assert_same_outputs([by_id[r.request_id] for r in good], off_engine(model).run(good))
    # a run of nothing but bad requests returns, too
    only_bad = engine.run([too_long, empty])
    assert [r.finish_reason for r in only_bad] == ["error", "error"]


# ------------------------------------------------------------------ 7. seeds


def test_sample_seed_depends_on_every_part():
    seeds = {sample_seed(s, rid, j) for s in (0, 1) for rid in ("a", "b", "a\x000") for j in range(4)}
    assert len(seeds) == 2 * 3 * 4
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(3, "x", 1) == sample_seed(3, "x", 1)
    assert sample_seed(0, "1", 0) != sample_seed(0, "10", 0) and sample_seed(1, "0", 0) != sample_seed(10, "", 0)


@pytest.mark.parametrize("cache", ["prefix", "off"])
def test_samples_differ_and_a_seed_reproduces_them(cache, model):
    rng = random.Random(7)
    prefix = toks(rng, 30)
    hot = SamplingParams(steps=16, gen_length=32, block_length=16, temperature=1.0)
    reqs = [Request(rid, toks(rng, 12), prefix, hot, sample_index=j, seed=123) for rid in ("u", "v") for j in range(3)]

    def engine() -> Engine:
        return prefix_engine(model, max_batch_size=4) if cache == "prefix" else off_engine(model, max_batch_size=4)

    first = engine().run(reqs)
    assert [r.seed for r in first] == [sample_seed(123, r.request_id, r.sample_index) for r in reqs]
    assert len({tuple(r.token_ids) for r in first}) == 6  # every sample its own
    assert_same_outputs(engine().run(reqs), first)  # a new engine
    assert_same_outputs(engine().run([reqs[4]]), [first[4]])  # alone, other neighbours
    reseeded = engine().run([dataclasses.replace(r, seed=124) for r in reqs])
    assert all(a.token_ids != b.token_ids for a, b in zip(reseeded, first))


# ------------------------------------------------------------------ 8. KVCache and budgets


def test_kv_cache_write_then_read_through_non_contiguous_pages():
    cfg = card(dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   mlp_hidden_size=128, vocab_size=256, embedding_size=256))  # the family card
    cache = KVCache(cfg, num_pages=8, page_size=PAGE, device=torch.device("cpu"), dtype=torch.float32)
    pages = [5, 2, 7]  # out of order, with gaps
    T = 40  # 2 full pages and 8 tokens of the third
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(T, cfg.n_kv_heads, cfg.head_dim, generator=g),
           torch.randn(T, cfg.n_kv_heads, cfg.head_dim, generator=g)) for _ in range(cfg.n_layers)]
    cache.write(pages, 0, [(k[:19], v[:19]) for k, v in kv])  # in two pieces, split mid-page
    cache.write(pages, 19, [(k[19:], v[19:]) for k, v in kv])
    back = cache.read(pages, T)
    assert len(back) == cfg.n_layers
    for (k, v), (k2, v2) in zip(kv, back):
        assert torch.equal(k2, k) and torch.equal(v2, v)
    assert torch.equal(cache.read(pages, 21)[1][0], kv[1][0][:21])
    # the tokens landed in the named pages, and nowhere else
    assert torch.equal(cache.k[0, 2, 3], kv[0][0][PAGE + 3]) and torch.equal(cache.v[1, 7, 0], kv[1][1][2 * PAGE])
    untouched = [p for p in range(8) if p not in pages]
    assert not cache.k[:, untouched].any() and not cache.v[:, untouched].any()
    assert not cache.k[:, 7, T - 2 * PAGE:].any()  # the rest of the partial page


def test_pages_for_budget_in_bytes_and_as_a_fraction(monkeypatch):
    import illada_batch.engine.kv_cache as kv_cache

    cfg = card(dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   mlp_hidden_size=128, vocab_size=256, embedding_size=256))  # the family card
    cpu = torch.device("cpu")
    per = bytes_per_page(cfg, PAGE, torch.float32)
    assert per == 2 * 2 * PAGE * 2 * 16 * 4  # K and V, layers, tokens, kv heads, head dim, fp32
    assert bytes_per_page(cfg, PAGE, torch.bfloat16) == per // 2
    assert KVCache(cfg, 3, PAGE, cpu, torch.float32).nbytes == 3 * per
    assert pages_for_budget(cfg, 10 * per, PAGE, torch.float32, cpu) == 10
    assert pages_for_budget(cfg, 10 * per - 1, PAGE, torch.float32, cpu) == 9
    assert pages_for_budget(cfg, 10 * per, PAGE, torch.bfloat16, cpu) == 20
    assert pages_for_budget(cfg, per - 1, PAGE, torch.float32, cpu) == 0
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 100 * per)
    assert pages_for_budget(cfg, 0.25, PAGE, torch.float32, cpu) == 25
    assert pages_for_budget(cfg, 1.0, PAGE, torch.float32, cpu) == 100
    assert pages_for_budget(cfg, 0.019, PAGE, torch.float32, cpu) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            pages_for_budget(cfg, bad, PAGE, torch.float32, cpu)


def test_engine_sizes_its_pool_from_kv_budget(model):
    engine = Engine(model, cache="prefix", kv_budget=7 * bpp(model) + 5)
    assert engine.pool.num_pages == 7 and engine.kv.nbytes == 7 * bpp(model)
    assert Engine(model, cache="off").pool is None
