"""The exact paged cache of block-causal families (``engine/block_causal.py``) on the tiny
LLaDA 2.x checkpoint: tokens equal the cache-off loop at temperature 0 for any prompt
lengths, block sizes, samplers and batch mixes (rows prefilling, rows at different blocks,
rows sharing a system prompt's pages, rows replacing finished ones); pages are shared
page by page; every iteration is one forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.cache_plan import BlockCausalCache
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.checkpoint import load_model
from illada_batch.train.tiny_llada2 import write_tiny_llada2
from tests.oracle import make_prompts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = load_model(write_tiny_llada2(tmp_path_factory.mktemp("tiny-llada2")), device="cpu", dtype=torch.float32)
    for p in m.parameters():  # memory-mapped safetensors can be misaligned: copy before tight comparisons
        p.data = p.data.clone()
    return m


def _prompts(lengths, system, seed):
    """Token prompts (no mask id) of the given lengths after ``system`` leading tokens shared by all."""
    shared = [t if t != 2 else 3 for t in make_prompts([system], seed + 1000, 2048, 2)[0]]
    return [shared + [t if t != 2 else 3 for t in p] for p in make_prompts(lengths, seed, 2048, 2)]


def _run(engine, prompts, params, prefix=()):
    reqs = [Request(str(i), tuple(p), tuple(prefix), params, 0, 7) for i, p in enumerate(prompts)]
    return [(r.token_ids, r.finish_reason, r.steps) for r in engine.run(reqs)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5), system=st.sampled_from([0, 5, 16, 23]),
       block=st.sampled_from([4, 8, 16]), blocks=st.integers(1, 3), steps_per_block=st.integers(1, 4),
       threshold=st.sampled_from([None, 0.2, 0.6]), editing=st.sampled_from([None, 0.3]),
       batch=st.integers(1, 4), page=st.sampled_from([4, 16]), mode=st.sampled_from(["prefix", "blocks"]),
       prefix=st.sampled_from([0, 6]), seed=st.integers(0, 99))
def test_tokens_equal_the_cache_off_loop(model, lengths, system, block, blocks, steps_per_block, threshold, editing,
                                         batch, page, mode, prefix, seed):
    """Mixed prompt lengths (rows prefilling while others decode, blocks at their own offsets),
    a shared system prompt (pages hit by later rows, or by rows joining in the same forward),
    a job prefix, small batches (finished rows replaced), pages smaller and larger than a block."""
    spb = min(steps_per_block, block)
    extra = {} if editing is None else {"editing_threshold": editing, "max_post_steps": 2}
    params = SamplingParams(steps=spb * blocks, gen_length=block * blocks, block_length=block, threshold=threshold,
                            transfer_rule="block_schedule", **extra)
    prompts = _prompts(lengths, system, seed)
    prefix_ids = list(range(300, 300 + prefix))
    off = Engine(model, cache="off", max_batch_size=batch)
    want = _run(off, prompts, params, prefix_ids)
    cached = Engine(model, cache=mode, max_batch_size=batch, page_size=page, kv_budget=2**22)
    assert _run(cached, prompts, params, prefix_ids) == want
    if off.counters.forward_passes:  # (a row with an empty prompt is an error row, never run)
        assert cached.counters.query_tokens < off.counters.query_tokens  # a step runs a block, not the row
    cached.pool.check_invariants()
    assert cached.pool.num_free_pages == cached.pool.num_pages  # every row gave its pages back


def test_two_prompts_sharing_a_system_prompt_share_its_pages(model):
    """Block 8, pages of 16: a 32-token system prompt is 2 pages; the rows differ after it, so
    the second row hits exactly those 2 pages (taken in the same iteration as the first,
    which writes them in the same forward) and its tokens are still the cache-off loop's."""
    params = SamplingParams(steps=4, gen_length=16, block_length=8, transfer_rule="block_schedule")
    prompts = _prompts([10, 13], 32, seed=5)
    engine = Engine(model, cache="prefix", max_batch_size=4, page_size=16, kv_budget=2**22)
    got = _run(engine, prompts, params)
    c = engine.counters
    assert (c.prefix_pages_hit, c.prefix_pages_missed, c.prefix_pages_read) == (2, 2, 4)  # 40 complete tokens: 2 pages each
    assert got == _run(Engine(model, cache="off"), prompts, params)
    again = _run(engine, list(reversed(prompts)), params)  # a later run reuses every complete page still in the pool
    assert (c.prefix_pages_hit, c.prefix_pages_missed) == (6, 2) and again == list(reversed(got))


def test_one_forward_per_iteration_with_rows_at_different_blocks(model):
    """Rows of different prompt lengths join as others finish: each iteration is one forward
    over every unfinished row, whatever block it is at or whether it is prefilling."""
    params = SamplingParams(steps=8, gen_length=16, block_length=4, transfer_rule="block_schedule")
    engine = Engine(model, cache="prefix", max_batch_size=2, page_size=4, kv_budget=2**22)
    _run(engine, _prompts([3, 30, 9, 17, 1], 0, seed=2), params)
    steps = engine.traffic.steps
    assert len(steps) == engine.counters.forward_passes and all(s.forwards == 1 for s in steps)


@pytest.mark.parametrize("mode", ["prefix", "blocks", "prefix+blocks"])
def test_every_mode_but_off_is_the_exact_cache_for_a_block_causal_card(model, mode):
    from illada_batch.engine.cache_plan import choose_plan
    from illada_batch.engine.requests import Counters

    engine = Engine(model, cache=mode, page_size=4, kv_budget=2**22)
    params = model.card.resolve(SamplingParams(gen_length=8, block_length=4, steps=4))
    plan = choose_plan(model, engine.cache, (), 20, engine.pool, engine.kv, "k", Counters(), params=params)
    assert isinstance(plan, BlockCausalCache) and plan.block == 4


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=4), system=st.sampled_from([0, 16, 40]),
       block=st.sampled_from([4, 8]), blocks=st.integers(1, 3), steps_per_block=st.integers(1, 4),
       threshold=st.sampled_from([None, 0.6]), editing=st.sampled_from([None, 0.3]), batch=st.integers(1, 4),
       page=st.sampled_from([4, 16]), chunk=st.integers(1, 30), seed=st.integers(0, 99))
def test_chunked_prefill_gives_the_cache_off_loop_s_tokens_and_steps(model, lengths, system, block, blocks,
                                                                      steps_per_block, threshold, editing, batch,
                                                                      page, chunk, seed):
    """Every chunk size (under a block: one block; not a multiple: rounded down), long and
    short prompts mixed, rows sharing a system prompt whose pages another row is still
    prefilling: tokens, finish reasons and sampler steps are cache off's (prefill-only
    iterations are not steps); the shared pages are prefilled once (the same query tokens as
    without chunking); no iteration runs more than the budget of prompt tokens beside each
    row's (at most two) blocks."""
    spb = min(steps_per_block, block)
    extra = {} if editing is None else {"editing_threshold": editing, "max_post_steps": 2}
    params = SamplingParams(steps=spb * blocks, gen_length=block * blocks, block_length=block, threshold=threshold,
                            transfer_rule="block_schedule", **extra)
    prompts = _prompts(lengths, system, seed)
    want = _run(Engine(model, cache="off", max_batch_size=batch), prompts, params)
    whole = Engine(model, cache="prefix", max_batch_size=batch, page_size=page, kv_budget=2**22)
    chunked = Engine(model, cache="prefix", max_batch_size=batch, page_size=page, kv_budget=2**22, prefill_chunk=chunk)
    assert _run(whole, prompts, params) == want
    assert _run(chunked, prompts, params) == want
    assert chunked.counters.query_tokens == whole.counters.query_tokens
    budget = max(block, chunk // block * block)
    assert max((s.query_tokens for s in chunked.traffic.steps), default=0) <= budget + batch * 2 * block
    chunked.pool.check_invariants()
    assert chunked.pool.num_free_pages == chunked.pool.num_pages


def test_a_long_prompt_joining_is_prefilled_in_chunks_beside_a_decoding_row(model):
    """A 200-token prompt joins beside a row that decodes from its first iteration: with a
    one-block budget no forward runs more than that block of prompt beside the rows' blocks
    (without it, the first forward runs all 200), and both rows' tokens and steps are the same."""
    params = SamplingParams(steps=32, gen_length=32, block_length=8, transfer_rule="block_schedule", suppress_eos=True)
    prompts = _prompts([5, 200], 0, seed=3)
    whole = Engine(model, cache="prefix", max_batch_size=2, page_size=8, kv_budget=2**22)
    chunked = Engine(model, cache="prefix", max_batch_size=2, page_size=8, kv_budget=2**22, prefill_chunk=8)
    assert _run(chunked, prompts, params) == _run(whole, prompts, params)
    assert max(s.query_tokens for s in whole.traffic.steps) >= 200
    per_step = [s.query_tokens for s in chunked.traffic.steps if s.forwards]
    assert max(per_step) <= 8 + 2 * 16
    # the long row prefilled a block in each of the first 24 forwards (192 of its 200 tokens)
    # while the short row ran its block in each (at a block's first step the one before too)
    assert all(q - 8 in (8, 16) for q in per_step[:24])


def test_a_row_hitting_pages_still_being_prefilled_waits_for_them():
    """Row 1 hits the 4 prompt pages row 0 registered but has not written: with a one-block
    budget row 0 writes them over two iterations; row 1 runs nothing until the iteration that
    writes the last of them, then runs in the same forward (writes precede reads)."""
    from illada_batch.engine.pages import PagePool
    from illada_batch.engine.prefill import PrefillSchedule, Span

    pool, block = PagePool(64, 4), 8
    schedule = PrefillSchedule(block, 4, chunk=10)  # rounded down to one block
    a = pool.allocate(list(range(16)), "k", 16 + 16, block)
    b = pool.allocate(list(range(16)), "k", 16 + 16, block)
    schedule.join(0, a)
    schedule.join(1, b)
    assert b.num_cached_tokens == 16 and schedule.waits_for[1] == set(a.pages[:4])
    assert schedule.plan([(0, 16, 24), (1, 16, 24)]) == [Span(0, 8, False), Span(16, 16, False)]
    schedule.check()
    assert schedule.plan([(0, 16, 24), (1, 16, 24)]) == [Span(8, 24, True), Span(16, 24, True)]
    schedule.check()
    assert not schedule.unwritten and schedule.cached == {0: 16, 1: 16}


@pytest.mark.parametrize("seed", [1, 4, 5])
def test_a_row_s_tokens_do_not_depend_on_its_batch_neighbours_in_bf16(tmp_path_factory, seed):
    """DESIGN's determinism in bf16, where a different summation order shows: rows sharing a
    system prompt's pages give the same tokens one at a time and four to a batch (with the
    shared pages read once for all rows, the row that wrote them read them whole alone and
    split in a batch, and its tokens changed)."""
    m = load_model(write_tiny_llada2(tmp_path_factory.mktemp("bf16")), device="cpu", dtype=torch.bfloat16)
    params = SamplingParams(steps=8, gen_length=16, block_length=8, transfer_rule="block_schedule")
    prompts = _prompts([3, 11, 20, 7], 16, seed)
    runs = [_run(Engine(m, cache="prefix", max_batch_size=b, page_size=4, kv_budget=2**22), prompts, params)
            for b in (1, 4)]
    assert runs[0] == runs[1]
