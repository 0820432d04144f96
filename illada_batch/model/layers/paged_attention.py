"""Attention that reads a row's K/V through its page table where they lie: a row's cache is
never gathered into a fresh tensor (the block cache's block-only step writes the block's
fresh K/V into the row's pages first, then attends to the pages).

The mask is data (``AttnMask``): each row's key count (padding), and optionally each query's
token index with a block size (block-causal). ``visible`` is
its one predicate; every kernel takes the mask through it (a dense boolean slice on CPU,
flash-attn's ``cache_seqlens`` for the key count alone).

Kernels, chosen by measurement (1 thread of this CPU; 16 rows of 704 keys, 32 queries,
4 heads of 32, per layer): gathering the rows' pages into one tensor and one SDPA call, as
before, 53-57 ms; one fused CPU flash call per row over *views* of its pages 38-44 ms;
FlexAttention with a paged block mask over a 1,024-page pool 4,700 ms in eager mode (it
computes scores over every physical slot) and 124 ms compiled (``torch.compile`` built its
CPU kernel in 203 s, again for each new shape). So:

- CPU (and any device without flash-attn): ``plan_pages`` works out, once per forward for
  every layer, how the pages are read: each row's table splits into runs of consecutive
  pages (the pool hands a row's pages out in order, so usually one run, or two for a row
  that hit a system prompt's pages); each run is a view of the pool ``[n * page_size, Hkv,
  hd]``, one fused call per (row, run), with a mask only where some query must not see some
  key (a row decoding its last block needs none). The runs, and a shared prefix (attended
  once for the batch), merge by log-sum-exp (``lse.merge_lse``). Grouped heads are broadcast
  by the kernel, never repeated. Off CPU without flash-attn, torch's efficient attention
  serves the same calls (its GQA repeat is counted as a copy). Measured (``bench --only
  blockdiff``, gen 256, 16 rows over a 400-token system prompt): a mask built per layer and
  per run was most of the attention's time before the plan (see ``PagePlan`` for why the
  shared pages are not read once for all rows).
- CUDA with flash-attn: ``flash_attn_with_kvcache(block_table=...)`` reads the pages in
  its kernel (imported lazily; flash-attn 2 takes pages of a multiple of 256 tokens:
  ``Engine(page_size=256)``). Not yet run: no GPU has run this code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from illada_batch.model.layers import traffic
from illada_batch.model.layers.lse import attention_lse, merge_lse


@dataclass(frozen=True)
class AttnMask:
    """Which keys a query may see. ``key_len`` [B]: a row's keys are its first key_len tokens
    (padding past them). With ``q_index`` [B, L] (each query's token index in its row) and
    ``block``, a query sees keys of its own block and earlier ones (block-causal)."""

    key_len: Tensor
    q_index: Tensor | None = None
    block: int | None = None

    @property
    def keys_only(self) -> bool:
        return self.block is None

    def visible(self, rows: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """The predicate: may query token ``q`` of row ``rows`` see key token ``k`` (broadcast)."""
        ok = k < self.key_len[rows]
        if self.block is not None:
            ok = ok & (k // self.block <= q // self.block)
        return ok

    def sees_all(self, lowest: int, start: int, n: int) -> bool:
        """``visible`` over a whole range at once: whether every query of a row (the lowest at
        token index ``lowest``) sees every key ``start`` to ``start + n`` (keys within the
        row's ``key_len``). The block rule is monotone, so the corners decide."""
        return self.block is None or (start + n - 1) // self.block <= lowest // self.block


@dataclass(frozen=True)
class Part:
    """Keys ``start`` to ``start + n`` of a row, on consecutive pages from ``page`` on, and
    which of the row's queries see which of them: ``seen`` [Lr, n], or None when every query
    sees every key (a row decoding its last block: the common case, no mask at all)."""

    page: int
    start: int
    n: int
    seen: Tensor | None


@dataclass(frozen=True)
class PagePlan:
    """How one forward's attention reads the pages, worked out once and shared by its layers:
    each row's keys as ``Part``s, its runs of consecutive pages in token order (usually one or
    two: the pool hands a row's pages out in order, and a row that hit a system prompt's
    pages starts with those), each with its mask where it needs one.

    Every kernel call and every merge is one row's own, of shapes that row alone decides, so a
    row gets the same numbers whoever shares its batch (DESIGN's determinism, in bf16 as in
    float32, at any thread count). Reading pages that rows share once for all of them
    (cascade attention: every row's queries in one call) was measured 1.2x faster at gen
    256 and batch 16, and broke that: the CPU kernel's result for a query changes with the
    other queries in its call (with two threads even across batch entries), and the row that
    wrote the shared pages reads them whole alone but split in a batch."""

    rows: list[list[Part]]
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    def additive(self, r: int, i: int, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """Row ``r``'s part ``i``'s mask as an additive [1, 1, Lr, n] in ``dtype``, and which
        queries see none of its keys [Lr] (made once; None when every query sees every key)."""
        seen = self.rows[r][i].seen
        if seen is None:
            return None
        key = (r, i, dtype)
        if key not in self._additive:
            # rows 16-element aligned (storage wider than the keys): torch's efficient attention,
            # the kernel off CPU, refuses others ("attn_bias is not correctly aligned")
            Lr, n = seen.shape
            add = torch.zeros(Lr, -(-n // 16) * 16, dtype=dtype, device=seen.device)[:, :n]
            add.masked_fill_(~seen, -torch.inf)
            self._additive[key] = add[None, None], ~seen.any(-1)
        return self._additive[key]


@dataclass(frozen=True)
class PagedKV:
    """One layer's pages ``k``/``v`` [num_pages, page_size, Hkv, hd], each row's page ``table``
    [B, n] in token order, the ``mask``, and the ``plan`` (``plan_pages``).

    ``segments`` (packed queries, rows of different query counts in one forward): the
    queries are one sequence q [1, H, N, hd], row r's the ``count`` from ``offset``
    (``(offset, count)`` per row, in order); ``mask.q_index`` [B, longest] then holds each
    row's query token indices, right-padded."""

    k: Tensor
    v: Tensor
    table: Tensor
    mask: AttnMask
    plan: PagePlan
    segments: list[tuple[int, int]] | None = None


def plan_pages(table: Tensor, mask: AttnMask, page_size: int,
               segments: list[tuple[int, int]] | None = None) -> PagePlan:
    """The ``PagePlan`` of rows with page ``table`` [B, n] under ``mask`` (see ``PagedKV``
    for ``segments``): each row's runs of consecutive pages holding its ``key_len`` tokens,
    each with its mask."""
    key_len = mask.key_len.tolist()
    L = 0 if mask.q_index is None else mask.q_index.shape[1]
    counts = [L] * len(key_len) if segments is None else [c for _, c in segments]  # each row's queries
    lowest = None  # each row's lowest query token index
    if not mask.keys_only:
        live = torch.arange(L, device=table.device)[None] < torch.tensor(counts, device=table.device)[:, None]
        lowest = mask.q_index.masked_fill(~live, torch.iinfo(mask.q_index.dtype).max).amin(1).tolist()
    seen = partial(_seen, mask, counts, lowest)
    return PagePlan([[Part(p, start, n, seen(r, start, n)) for p, start, n in _runs(pages, n, page_size)]
                     for r, (pages, n) in enumerate(zip(table.tolist(), key_len))])


def _runs(pages: list[int], n: int, ps: int) -> list[tuple[int, int, int]]:
    """A row's ``n`` tokens on its ``pages`` as runs of consecutive pages: (first page, first
    token index, tokens), in token order."""
    runs: list[list[int]] = []
    for i in range(-(-n // ps)):
        if runs and pages[i] == runs[-1][0] + runs[-1][2] // ps:
            runs[-1][2] += ps
        else:
            runs.append([pages[i], i * ps, ps])
    if runs:
        runs[-1][2] = n - runs[-1][1]  # the last page holds the row's last tokens only
    return [tuple(r) for r in runs]


def _seen(mask: AttnMask, counts: list[int], lowest: list[int] | None, r: int, start: int, n: int) -> Tensor | None:
    """Which of row ``r``'s ``counts[r]`` queries (the lowest at token index ``lowest[r]``)
    see which of its keys ``start`` to ``start + n``: [count, n] boolean, or None when every
    query sees every one (decided without building it: the common case)."""
    if mask.keys_only or mask.sees_all(lowest[r], start, n):
        return None
    rows = torch.tensor([r], device=mask.key_len.device)
    keys = torch.arange(start, start + n, device=mask.key_len.device)
    return mask.visible(rows[:, None], mask.q_index[r, :counts[r], None], keys[None])  # [count, n]


def paged_attention(q: Tensor, kv: PagedKV, prefix: tuple[Tensor, Tensor] | None) -> Tensor:
    """q [B, H, L, hd] over each row's pages (``kv``) and a ``prefix`` every query sees
    (k, v [P, Hkv, hd], shared by every row), -> [B, H, L, hd]."""
    B, H, L, hd = q.shape
    P = 0 if prefix is None else prefix[0].shape[0]
    if traffic.step() is not None:
        keys = int(kv.mask.key_len.sum())
        pairs = L * (keys + B * P) if kv.segments is None else \
            sum(c * n for (_, c), n in zip(kv.segments, kv.mask.key_len.tolist())) + L * P
        traffic.attended(pairs, keys + B * P)
    if q.is_cuda and kv.mask.keys_only and kv.k.shape[1] % 256 == 0 and _flash_attn() is not None:
        parts = [_flash_paged(q, kv)]
    else:
        parts = [_rows_over_views(q, kv)]
    if prefix is not None:  # (stacked rows only: one call over packed rows' queries would tie them together)
        if kv.segments is not None:
            raise ValueError("paged attention: packed queries take no shared prefix (the block-causal path has none)")
        pk, pv = (t.to(q.dtype).transpose(0, 1)[None].expand(B, -1, -1, -1) for t in prefix)  # [B, Hkv, P, hd] views
        parts.append(attention_lse(q, pk, pv, None))
    return (merge_lse(parts) if len(parts) > 1 else parts[0][0]).to(q.dtype)  # (a row's runs merge in float32)


def _view(kv: PagedKV, page: int, n: int) -> tuple[Tensor, Tensor]:
    """The pool's ``n`` tokens on consecutive pages from ``page`` on: k, v [1, Hkv, n, hd] views."""
    _, ps, hkv, hd = kv.k.shape
    if kv.k.is_contiguous() and kv.v.is_contiguous():  # one strided view each (the same memory, fewer ops)
        return tuple(t.as_strided((1, hkv, n, hd), (hd * hkv, hd, hkv * hd, 1),
                                  t.storage_offset() + page * ps * hkv * hd) for t in (kv.k, kv.v))
    pages = slice(page, page + -(-n // ps))
    return tuple(t[pages].flatten(0, 1)[:n].transpose(0, 1)[None] for t in (kv.k, kv.v))


def _rows_over_views(q: Tensor, kv: PagedKV) -> tuple[Tensor, Tensor]:
    """Per row, per part of its pages (``kv.plan``): the fused kernel over a view of the
    pool, the parts merged by log-sum-exp; -> (out [B, H, L, hd], lse [B, H, L] float32)."""
    outs, lses = [], []
    for r, parts in enumerate(kv.plan.rows):
        qr = q[r:r + 1] if kv.segments is None else q[:, :, kv.segments[r][0]:sum(kv.segments[r])]  # [1, H, Lr, hd]
        runs = [_attend_part(qr, kv, r, i) for i in range(len(parts))]
        o, lse = merge_lse(runs, keep_lse=True) if len(runs) > 1 else runs[0]
        outs.append(o)
        lses.append(lse)
    dim = 0 if kv.segments is None else 2  # rows stacked, or packed queries in their order
    return torch.cat(outs, dim), torch.cat(lses, dim)


def _attend_part(qr: Tensor, kv: PagedKV, r: int, i: int) -> tuple[Tensor, Tensor]:
    """Row ``r``'s queries ``qr`` [1, H, Lr, hd] over its part ``i`` -> (out, lse)."""
    part, m = kv.plan.rows[r][i], kv.plan.additive(r, i, qr.dtype)
    o, lse = attention_lse(qr, *_view(kv, part.page, part.n), None if m is None else m[0])
    if m is not None:  # a query that sees none of this part's keys (a later block) gets no weight
        o, lse = o.masked_fill(m[1][:, None], 0), lse.masked_fill(m[1], -torch.inf)  # (the CPU kernel says lse 0)
    return o, lse


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _flash_paged(q: Tensor, kv: PagedKV) -> tuple[Tensor, Tensor]:
    """flash-attn reads the pages through the table in its kernel (CUDA; not yet run)."""
    out, lse = _flash_attn()(q.transpose(1, 2), kv.k, kv.v, cache_seqlens=kv.mask.key_len.int(),
                             block_table=kv.table.int(), causal=False, return_softmax_lse=True)
    return out.transpose(1, 2), lse.float()  # [B, H, L, hd], [B, H, L]
