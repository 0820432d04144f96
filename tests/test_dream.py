"""Dream on a tiny random checkpoint in its real Hugging Face layout (``train/tiny_families.py``):
the model against an oracle written from the architecture's definition, the sampler
against Dream's reference ``diffusion_generate`` at temperature 0 (``tests/dream_oracle.py``),
and every cache mode of a bidirectional family giving the tokens the cache computes."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch
from dream_oracle import DreamOracle, oracle_diffusion_generate, shifted
from oracle import left_pad, oracle_generate
from test_block_cache import (  # noqa: F401  (run on this model: the logit shift)
    test_a_block_only_step_copies_no_row_cache,
    test_paged_attention_logits_equal_the_gathered_path_for_any_batch_mix,
)

from illada_batch import generate
from illada_batch.decoding.loop import DecodeBatch, FullForward, denoise_step, row_generators
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.cache_plan import BlockCache, encode_isolated
from illada_batch.engine.diffusion import Engine, Request
from illada_batch.engine.kv_cache import KVCache
from illada_batch.engine.pages import PagePool
from illada_batch.model.checkpoint import load_model
from illada_batch.model.registry import card_of

torch.set_num_threads(1)
PROMPT_LENGTHS = [5, 2, 9, 6]  # different lengths: the batch is left padded


@pytest.fixture(scope="module")
def ckpt(family_checkpoint):
    return family_checkpoint("dream")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def oracle(ckpt):
    return DreamOracle(ckpt)


def prompts(model, seed=0, lengths=PROMPT_LENGTHS):
    """Random ids above the tiny tokenizer's special tokens (0..5)."""
    rng = random.Random(seed)
    return [[rng.randrange(6, model.card.vocab_size) for _ in range(n)] for n in lengths]


def test_the_card_says_dream(ckpt, model):
    card = card_of(ckpt)
    assert (card.family, card.logit_shift, card.mask_token_id, card.eos_token_id) == ("dream", 1, 2, 1)
    assert card.kv_bytes_per_token(4) == 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16
    assert card.parameters == sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "Dream"


def test_logits_match_the_oracle_shifted_by_one(model, oracle):
    """A left-padded batch: each row's logits equal the oracle's on that row alone, position i
    from hidden state i-1 (the reference's ``cat([logits[:, :1], logits[:, :-1]])``)."""
    rows = [[7 + i for i in range(n)] for n in (11, 4, 8)]
    ids, mask = left_pad(rows, model.card.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model.run(ids, attention_mask=mask.bool(), positions=positions).logits.double()  # [B, L, V]
    for b, row in enumerate(rows):
        want = shifted(oracle(row))  # [n, V]
        # A row's first token is never predicted; behind left padding (as in the reference) it
        # reads a padding column's state, so it is left out.
        torch.testing.assert_close(got[b, 1 - len(row):], want[1:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "origin"])
@pytest.mark.parametrize("steps,gen_length", [(8, 8), (4, 16), (12, 16)])
def test_sampler_follows_dreams_reference_at_temperature_0(model, oracle, alg, steps, gen_length):
    """``generate`` on a left-padded batch picks the reference's tokens row by row; with
    steps == gen_length that includes its quirk (nothing filled at the first step, two at the
    last). ``origin`` draws from each row's own generator, as the oracle does."""
    rows = prompts(model)
    ids, mask = left_pad(rows, model.card.pad_token_id)
    seeds = [11, 12, 13, 14]
    out = generate(model, ids, attention_mask=mask, steps=steps, gen_length=gen_length, block_length=gen_length,
                   alg=alg, seed=seeds)
    for b, row in enumerate(rows):
        want, filled = oracle_diffusion_generate(
            oracle, row, gen_length, steps, alg,
            model.card.mask_token_id, generator=torch.Generator().manual_seed(seeds[b]))
        assert out[b, -gen_length:].tolist() == want, f"row {b}"
        if steps == gen_length and alg != "origin":
            assert filled[0] == 0 and filled[-1] == 2


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_block_decoding_follows_the_block_schedule_on_shifted_logits(model, threshold):
    """Block-wise decoding (LLaDA's schedule or the confidence threshold) on Dream: the LLaDA
    oracle, reading Dream's shifted logits."""
    class Shifted:
        card = type("C", (), {"mask_token_id": model.card.mask_token_id})

        def __call__(self, x):
            return model.run(x).logits

    rows = prompts(model, seed=1)
    ids, mask = left_pad(rows, model.card.pad_token_id)
    out = generate(model, ids, attention_mask=mask, steps=8, gen_length=16, block_length=4, threshold=threshold)
    for b, row in enumerate(rows):
        want, _ = oracle_generate(Shifted(), row, 8, 16, 4, threshold=threshold)
        assert out[b, -16:].tolist() == want


@pytest.mark.parametrize("cache", [m.value for m in CacheMode.concrete()])
@pytest.mark.parametrize("params", [SamplingParams(steps=16, gen_length=16, block_length=4, early_stop=False),
                                    SamplingParams(steps=16, gen_length=16, block_length=16, alg="entropy"),
                                    SamplingParams(steps=16, gen_length=16, block_length=4, threshold=0.3)],
                         ids=["blocks", "alg", "threshold"])
def test_every_cache_mode_runs_dream(model, cache, params):
    """Each mode gives what it computes: ``off`` the reference tokens (``generate``); ``prefix``
    the cache off with the prefix isolated; the block caches, with a refresh at every step
    (block_length 1 step per block), the cache off."""
    rows, prefix = prompts(model, seed=2), tuple(range(40, 61))
    engine = Engine(model, cache=cache, max_batch_size=3)
    got = engine.run([Request(f"r{i}", tuple(r), prefix, params) for i, r in enumerate(rows)])
    assert [r.finish_reason for r in got] != ["error"] * len(rows) and all(r.error is None for r in got)
    if cache in ("off", "prefix"):
        isolate = cache == "prefix"
        for r, row in zip(got, rows):
            batch = DecodeBatch.from_prompts([list(prefix) + row], params, model.card.mask_token_id,
                                             model.card.pad_token_id, row_generators([r.seed], model.device),
                                             model.device, prefix_lengths=[len(prefix)])
            while not bool(batch.done.all()):
                denoise_step(model, batch, params, FullForward(isolate_prefix=isolate))
            ids = batch.x[0, -params.gen_length:].tolist()
            eos = model.card.eos_token_id
            assert r.token_ids == (ids[:ids.index(eos)] if eos in ids else ids)


@pytest.mark.parametrize("shared", [False, True], ids=["blocks", "prefix+blocks"])
def test_block_only_forward_reads_the_state_before_the_block(model, shared):
    """With the shift, a block's first position is predicted by the position before the block:
    the block-only forward runs that position too, so right after a refresh it gives the full
    forward's logits (Fast-dLLM's Dream reads the block's own first state there instead)."""
    rng = random.Random(4)
    params = SamplingParams(early_stop=False, steps=16, gen_length=32, block_length=8)
    prefix = tuple(rng.randrange(6, 2048) for _ in range(21))
    shared_kv = encode_isolated(model, prefix) if shared else None
    pool, kv = PagePool(64, 16), KVCache(model.card, 64, 16, model.device, model.dtype)
    plan = BlockCache(prefix, shared_kv, None, pool, kv)
    queue = deque((i, Request(f"r{i}", tuple(rng.randrange(6, 2048) for _ in range(n)), prefix, params))
                  for i, n in enumerate((3, 17, 9)))
    batch = plan.new_rows(plan.take(queue, 3, params), params, model)
    G, BL, L = 32, 8, batch.x.shape[1]
    batch.block[:] = torch.tensor([0, 1, 3])
    for r in range(3):  # earlier blocks filled, the current one partly
        b = int(batch.block[r])
        batch.x[r, L - G:L - G + b * BL + 3] = torch.tensor([rng.randrange(6, 2048) for _ in range(b * BL + 3)])
    cols = (L - G) + batch.block[:, None] * BL + torch.arange(BL)  # [3, BL]
    rows = torch.arange(3)
    with torch.no_grad():
        full = FullForward(prefix_kv=shared_kv).block_logits(model, batch, rows, cols, params)  # [3, BL, V]
        batch.step[:] = 0
        refreshed = plan.forward.block_logits(model, batch, rows, cols, params)
        batch.step[:] = 1
        block_only = plan.forward.block_logits(model, batch, rows, cols, params)
    torch.testing.assert_close(refreshed, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block_only, full, rtol=1e-4, atol=1e-4)
    for r in list(plan.row_pages):
        plan.release(r)
    plan.close()


@pytest.mark.parametrize("cache", ["prefix", "prefix+blocks"])
def test_an_empty_prompt_after_a_shared_prefix_is_a_bad_row(model, cache):
    """Its first response token would be read from a state the shared prefix does not keep:
    the row gets an error, its neighbours are generated."""
    params = SamplingParams(steps=8, gen_length=8, block_length=8)
    got = Engine(model, cache=cache).run([Request("a", (), (7, 8, 9), params), Request("b", (10,), (7, 8, 9), params)])
    assert got[0].finish_reason == "error" and "empty prompt" in got[0].error
    assert got[1].error is None


@pytest.mark.slow
def test_a_job_on_the_tiny_dream_checkpoint_runs_end_to_end(ckpt, ray_cluster, tmp_path):
    """A job whose model.path is a Dream checkpoint, on local Ray, with Dream's own sampler and
    the block cache: every (row, sample) once, the model column naming it."""
    import fsspec
    from pipeline_support import assert_exactly_once, job_dict, read_output, write_prompts

    from illada_batch.job.driver import run_job
    from illada_batch.job.spec import spec_from_dict

    fs = fsspec.filesystem("file")
    ids = [f"r{i:02d}" for i in range(10)]
    write_prompts(fs, str(tmp_path / "in.parquet"), ids, [f"Input: word {i}\nOutput:" for i in range(10)])
    spec = spec_from_dict(job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), None, n=2,
                                   model={"path": str(ckpt)}, engine={"cache": "prefix+blocks", "max_batch_size": 4},
                                   sampling={"steps": 8, "gen_length": 8, "block_length": 8, "alg": "entropy"}))
    report = run_job(spec, show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0 and report.samples == 2 * len(ids)
    table = read_output(fs, str(tmp_path / "out"))
    assert_exactly_once(table, ids, n=2)
    assert set(table.column("model").to_pylist()) == {f"dream:{ckpt}"}
