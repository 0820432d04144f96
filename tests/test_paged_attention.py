"""Paged attention (``model/layers/paged_attention.py``) against dense attention over the same
keys under the same mask (``AttnMask.visible``): rows of any lengths, pages anywhere in the
pool (one run or many), leading pages shared by every row or by some (a system prompt's,
anywhere in the pool, consecutive or not), twin rows (one prompt's samples), block-causal
masks (the plan decides from a range's corners when no mask is needed),
queries that see none of a run's keys, packed or stacked queries, a shared ``prefix``,
float32 and bfloat16; and each row's result is, bit for bit, what it gets alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

from illada_batch.model.layers.paged_attention import AttnMask, PagedKV, paged_attention, plan_pages

H, HKV, HD = 4, 2, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _dense(q_rows, k_rows, v_rows, seen_rows):
    """Each row on its own: q [1, H, Lr, hd] over its keys [1, Hkv, T, hd] under ``seen`` [Lr, T]."""
    out = []
    for q, k, v, seen in zip(q_rows, k_rows, v_rows, seen_rows):
        k, v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=seen[None, None]))
    return out


def _tables(data, lengths: list[int], ps: int, shared_pages: int, pool: int) -> list[list[int]]:
    """Each row's page table: ``shared_pages`` leading pages that rows may share (a system
    prompt's: from anywhere in the pool, consecutive or not), the rest its own pages anywhere
    (one run or many); a row may be its predecessor's twin (the same table)."""
    first = data.draw(st.integers(0, 8))
    step = data.draw(st.sampled_from([1, 2]))  # consecutive page ids or not
    common = [first + step * i for i in range(shared_pages)]
    free = iter(data.draw(st.permutations([p for p in range(pool) if p not in common])))
    width = max(shared_pages, *(-(-n // ps) for n in lengths))
    tables = []
    for r in range(len(lengths)):
        kind = "shares" if r == 0 else data.draw(st.sampled_from(["shares", "own", "twin"]))
        if kind == "twin":
            tables.append(list(tables[-1]))
            continue
        lead = common if kind == "shares" else [next(free) for _ in common]
        tables.append(lead + [next(free) for _ in range(width - shared_pages)])
    return tables


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_paged_attention_equals_dense_attention_for_any_tables_and_masks(data):
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ps = data.draw(st.sampled_from([2, 4, 8]))
    block = data.draw(st.sampled_from([None, 4, 8]))
    packed = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    B = data.draw(st.integers(1, 4))
    shared_pages = data.draw(st.integers(0, 3))  # leading pages rows may share (a system prompt's)
    # a row's keys may end inside the shared pages (a row prefilling them, chunk by chunk)
    lengths = [max(1, shared_pages * ps + data.draw(st.integers(-2 * ps, 20))) for _ in range(B)]
    pool = 96
    tables = _tables(data, lengths, ps, shared_pages, pool)
    table = torch.tensor(tables)
    kpool, vpool = (torch.randn(pool, ps, HKV, HD, generator=g).to(dtype) for _ in range(2))
    P = 0 if packed else data.draw(st.sampled_from([0, 3]))  # a shared prefix's keys, seen by every query
    prefix = tuple(torch.randn(P, HKV, HD, generator=g).to(dtype) for _ in range(2)) if P else None
    # each row's queries: its last `count` tokens (a block's, or a prefill's), every one a real token
    counts = [data.draw(st.integers(1, n)) for n in lengths]
    key_len = torch.tensor(lengths)
    longest = max(counts)
    q_index = torch.stack([torch.arange(n - c, n - c + longest).clamp(max=n - 1) for n, c in zip(lengths, counts)])
    mask = AttnMask(key_len=key_len, q_index=q_index, block=block)
    segments = None
    if packed:
        offsets = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
        segments = list(zip(offsets.tolist(), counts))
        q = torch.randn(1, H, sum(counts), HD, generator=g).to(dtype)
        q_rows = [q[:, :, o:o + c] for o, c in segments]
    else:  # stacked rows, each with `longest` queries (padded ones repeat the last token)
        counts = [longest] * B
        q = torch.randn(B, H, longest, HD, generator=g).to(dtype)
        q_rows = [q[r:r + 1] for r in range(B)]
    plan = plan_pages(table, mask, ps, segments)
    note(f"{lengths=} {counts=} {tables=} {q_index.tolist()=} {plan=}")
    got = paged_attention(q, PagedKV(kpool, vpool, table, mask, plan, segments), prefix)
    assert got.dtype == dtype

    k_rows, v_rows, seen_rows = [], [], []
    for r, n in enumerate(lengths):
        slots = torch.tensor([table[r, t // ps] * ps + t % ps for t in range(n)])
        k, v = (t.flatten(0, 1)[slots] for t in (kpool, vpool))  # [n, Hkv, hd]
        if prefix is not None:
            k, v = torch.cat([prefix[0], k]), torch.cat([prefix[1], v])
        k_rows.append(k.float().transpose(0, 1)[None])
        v_rows.append(v.float().transpose(0, 1)[None])
        seen = mask.visible(torch.tensor([[r]]), q_index[r, :counts[r], None], torch.arange(n)[None])
        seen_rows.append(torch.cat([torch.ones(counts[r], P, dtype=torch.bool), seen.expand(counts[r], n)], 1))
    want = _dense([t.float() for t in q_rows], k_rows, v_rows, seen_rows)
    got_rows = [got[:, :, o:o + c] for o, c in segments] if packed else [got[r:r + 1] for r in range(B)]
    for r in range(B):
        torch.testing.assert_close(got_rows[r].float(), want[r], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    # DESIGN's determinism: a row's numbers are those it gets alone, bit for bit (bf16 too)
    for r in range(B):
        one = AttnMask(key_len=key_len[r:r + 1], q_index=q_index[r:r + 1, :counts[r]], block=block)
        seg = [(0, counts[r])] if packed else None
        alone = paged_attention(q_rows[r], PagedKV(kpool, vpool, table[r:r + 1], one,
                                                   plan_pages(table[r:r + 1], one, ps, seg), seg), prefix)
        assert torch.equal(alone, got_rows[r]), f"row {r} differs from itself alone"


def test_a_part_no_query_sees_gives_no_weight():
    """A prefilling row whose first block's queries see none of its next block's keys, the
    row's pages in two runs: the kernel's log-sum-exp for a query that sees nothing must not
    weigh that part (the CPU flash kernel reports 0 there, not -inf)."""
    ps, block = 4, 8
    table = torch.tensor([[0, 1, 7, 8]])  # two runs: tokens 0-7 and 8-15
    kpool, vpool = torch.randn(16, ps, HKV, HD), torch.randn(16, ps, HKV, HD)
    mask = AttnMask(key_len=torch.tensor([16]), q_index=torch.arange(16)[None], block=block)
    q = torch.randn(1, H, 16, HD)
    got = paged_attention(q, PagedKV(kpool, vpool, table, mask, plan_pages(table, mask, ps)), None)
    slots = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 28, 29, 30, 31, 32, 33, 34, 35])
    k, v = (t.flatten(0, 1)[slots].transpose(0, 1)[None] for t in (kpool, vpool))
    seen = mask.visible(torch.tensor([[0]]), torch.arange(16)[:, None], torch.arange(16)[None])
    want = _dense([q], [k], [v], [seen])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_every_mask_the_plan_makes_has_rows_aligned_for_torch_s_efficient_attention(n, dtype):
    """Off CPU without flash-attn the masks go to torch's efficient attention, which refuses an
    additive mask whose rows do not start 16-element aligned ("attn_bias is not correctly
    aligned"; SDPA pads the mask for it, the direct call does not): a prefilling row's mask
    over any number of keys has a row stride of a multiple of 16, and its values are the mask."""
    table = torch.arange(n)[None]  # pages of one token: a part of any key count
    mask = AttnMask(key_len=torch.tensor([n]), q_index=torch.arange(n)[None], block=1)
    plan = plan_pages(table, mask, 1, [(0, n)])
    add, sees_none = plan.additive(0, 0, dtype)
    assert add.stride(-1) == 1 and add.stride(-2) % 16 == 0
    assert torch.equal(add[0, 0] == 0, plan.rows[0][0].seen) and not sees_none.any()
