"""``kv_budget`` for block-causal rows: a pool that holds one row of the model's longest
sequence runs it, one page less is refused before any work, by the engine and by
``validate``/``run`` (naming kv_budget and the numbers). Blocks are aligned at 0, so a row's
pages hold its complete prompt blocks, the response and one more block (the last block's
tail, or a filler block when the prompt ends on a block boundary): the longest sequence is
``((max - gen) // block + 1) * block + gen`` tokens, a block more than the model's context."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.cache_plan import BlockCausalCache
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.kv_cache import bytes_per_page
from illada_batch.engine.pages import PagePool
from illada_batch.engine.requests import Counters, Request
from illada_batch.errors import ParamsError
from illada_batch.model.checkpoint import load_model
from illada_batch.model.family import AttentionKind, FamilyCard

GEN, BLOCK = 16, 8


def _card(max_len: int, block: int | None = None) -> FamilyCard:
    return FamilyCard("llada2", 2, 1, 1, 64, max_len, AttentionKind.BLOCK_CAUSAL, block)


@settings(max_examples=200, deadline=None)
@given(max_len=st.integers(8, 200), blocks=st.integers(1, 4), block=st.sampled_from([1, 2, 4, 8, 16]),
       page=st.sampled_from([1, 4, 16]), prefix=st.integers(0, 20), longest=st.booleans(), data=st.data())
def test_one_row_of_the_longest_sequence_fits_exactly_its_pages(max_len, blocks, block, page, prefix, longest, data):
    """Every row the model admits (prefix + prompt + gen <= its context) gets its pages from a
    pool of ``longest_row`` tokens' pages; with one page less the longest row (its prompt
    ending on a block boundary) never gets them."""
    gen = block * blocks
    if gen >= max_len:
        return
    room = max_len - gen  # the most prefix + prompt tokens a row may have
    total = room // block * block if longest else data.draw(st.integers(0, room))
    pre = min(prefix, total)
    need = -(-_card(max_len).longest_row(gen, block) // page)
    params = SamplingParams(steps=blocks, gen_length=gen, block_length=block)

    def takes(pages: int) -> bool:
        plan = BlockCausalCache(tuple(range(10, 10 + pre)), PagePool(pages, page), None, block, "m", Counters())
        row = Request("r", tuple([5] * (total - pre)), (), params, 0, 0)
        return bool(plan.take(deque([(0, row)]), 1, params))

    assert takes(need)
    if longest and need > 1:
        assert not takes(need - 1)


@pytest.fixture(scope="module")
def model(family_checkpoint):
    return load_model(family_checkpoint("llada2"), device="cpu", dtype=torch.float32)


def test_the_engine_runs_in_exactly_the_computed_pool_and_refuses_one_page_less(model):
    """Before: the engine's one-row check counted the model's 1024 tokens (64 pages), a row of a
    1008-token prompt (whole blocks) took 65, and the run stopped on 'no row fits'."""
    card, params = model.card, SamplingParams(steps=4, gen_length=GEN, block_length=BLOCK)
    need = -(-card.longest_row(GEN, BLOCK) // 16)
    assert (card.longest_row(GEN, BLOCK), need) == (1032, 65)
    page_bytes = bytes_per_page(card, 16, torch.float32)
    prompts = [tuple(3 + i % 50 for i in range(n)) for n in (1008, 1007)]  # whole blocks, and a partial last one
    reqs = [Request(str(i), p, (), params, 0, 0) for i, p in enumerate(prompts)]
    fits = Engine(model, max_batch_size=1, kv_budget=need * page_bytes)
    assert [r.error for r in fits.run(reqs)] == [None, None] and fits.block_causal  # (tokens: test_block_causal.py)
    fits.pool.check_invariants()
    short = Engine(model, max_batch_size=1, kv_budget=(need - 1) * page_bytes)
    with pytest.raises(ParamsError, match=rf"kv_budget={(need - 1) * page_bytes}: 64 pages, but .*needs 65 .*1032 "):
        short.run(reqs[1:])
    assert short.counters.forward_passes == 0  # refused before any work


@pytest.mark.parametrize("pages, refused", [(65, False), (64, True)])
def test_validate_and_run_refuse_a_pool_too_small_for_a_block_causal_row(family_checkpoint, tmp_path, pages, refused):
    from illada_batch.job.preflight import model_problems
    from illada_batch.job.spec import spec_from_dict
    from illada_batch.model.registry import card_of

    directory = family_checkpoint("llada2")
    page_bytes = 16 * card_of(directory).kv_bytes_per_token(4)  # float32 on a CPU replica
    def problems(**engine) -> list[str]:
        spec = spec_from_dict({"name": "t", "model": {"path": str(directory)}, "input": {"url": str(tmp_path / "i")},
                               "output": {"url": str(tmp_path / "out")}, "engine": {"kv_budget": pages * page_bytes,
                                                                                    **engine},
                               "sampling": {"steps": 4, "gen_length": GEN, "block_length": BLOCK}})
        return [p for p in model_problems(spec)[0] if "kv_budget" in p]

    if not refused:
        assert problems() == []
        return
    assert problems() == [f"engine.kv_budget: {pages * page_bytes:,} bytes hold 64 pages of 16 tokens; cache 'auto -> "
                        f"blocks (exact block-causal cache)' needs 65 ({65 * page_bytes:,} bytes) for one row of the "
                        f"model's longest sequence (1032 tokens)"]
    assert problems(cache="off") == []  # the cache off keeps no pages
