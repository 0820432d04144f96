"""Attention that reads a row's K/V through its page table where they lie: a row's cache is
never gathered into a fresh tensor (the block cache's block-only step writes the block's
fresh K/V into the row's pages first, then attends to the pages).

The mask is data (``AttnMask``): each row's key count (padding), and optionally each query's
token index with an isolated prefix's end and a block size (block-causal). ``visible`` is
its one predicate; every kernel takes the mask through it (a dense boolean slice on CPU,
flash-attn's ``cache_seqlens`` for the key count alone).

Kernels, chosen by measurement (1 thread of this CPU; 16 rows of 704 keys, 32 queries,
4 heads of 32, per layer): gathering the rows' pages into one tensor and one SDPA call, as
before, 53-57 ms; one fused CPU flash call per row over *views* of its pages 38-44 ms;
FlexAttention with a paged block mask over a 1,024-page pool 4,700 ms in eager mode (it
computes scores over every physical slot) and 124 ms compiled (``torch.compile`` built its
CPU kernel in 203 s, again for each new shape). So:

- CPU (and any device without flash-attn): a row's page table splits into runs of
  consecutive pages (the pool hands a row's pages out in order, so a row is usually one
  run); each run is a view of the pool ``[n * page_size, Hkv, hd]``; one fused call per
  (row, run) returns its log-sum-exp, and the runs and a shared prefix (attended once for
  the batch) merge by it (``lse.merge_lse``). Grouped heads are broadcast by the
  kernel, never repeated. Off CPU without flash-attn, torch's efficient attention serves the
  same calls (its GQA repeat is counted as a copy).
- CUDA with flash-attn: ``flash_attn_with_kvcache(block_table=...)`` reads the pages in
  its kernel (imported lazily; flash-attn 2 takes pages of a multiple of 256 tokens:
  ``Engine(page_size=256)``). Not yet run: no GPU has run this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from illada_batch.model.layers import traffic
from illada_batch.model.layers.lse import attention_lse, merge_lse

Run = tuple[int, int, int]  # (first page id, first token index in the row, tokens)


@dataclass(frozen=True)
class AttnMask:
    """Which keys a query may see. ``key_len`` [B]: a row's keys are its first key_len tokens
    (padding past them). With ``q_index`` [B, L] (each query's token index in its row):
    ``prefix_end`` [B], tokens before it attend only to each other (an isolated prefix);
    ``block``, a query sees keys of its own block and earlier ones (block-causal)."""

    key_len: Tensor
    q_index: Tensor | None = None
    prefix_end: Tensor | None = None
    block: int | None = None

    @property
    def keys_only(self) -> bool:
        return self.prefix_end is None and self.block is None

    def visible(self, rows: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """The predicate: may query token ``q`` of row ``rows`` see key token ``k`` (broadcast)."""
        ok = k < self.key_len[rows]
        if self.prefix_end is not None:
            end = self.prefix_end[rows]
            ok = ok & ((q >= end) | (k < end))
        if self.block is not None:
            ok = ok & (k // self.block <= q // self.block)
        return ok


@dataclass(frozen=True)
class PagedKV:
    """One layer's pages ``k``/``v`` [num_pages, page_size, Hkv, hd], each row's page ``table``
    [B, n] in token order, the ``mask``, and the table's ``runs`` (``page_runs``).

    ``segments`` (packed queries, rows of different query counts in one forward): the
    queries are one sequence q [1, H, N, hd], row r's the ``count`` from ``offset``
    (``(offset, count)`` per row, in order); ``mask.q_index`` [B, longest] then holds each
    row's query token indices, right-padded."""

    k: Tensor
    v: Tensor
    table: Tensor
    mask: AttnMask
    runs: list[list[Run]]
    segments: list[tuple[int, int]] | None = None


def page_runs(table: Tensor, key_len: Tensor, page_size: int) -> list[list[Run]]:
    """Each row's pages holding its ``key_len`` tokens as runs of consecutive page ids."""
    out = []
    for pages, n in zip(table.tolist(), key_len.tolist()):
        runs: list[list[int]] = []
        for i, p in enumerate(pages[:-(-n // page_size)]):
            if runs and p == runs[-1][0] + runs[-1][2] // page_size:
                runs[-1][2] += page_size
            else:
                runs.append([p, i * page_size, page_size])
        if runs:
            runs[-1][2] = n - runs[-1][1]  # the last page holds the row's last tokens only
        out.append([tuple(r) for r in runs])
    return out


def paged_attention(q: Tensor, kv: PagedKV, prefix: tuple[Tensor, Tensor] | None) -> Tensor:
    """q [B, H, L, hd] over each row's pages (``kv``) and a ``prefix`` every query sees
    (k, v [P, Hkv, hd], shared by every row), -> [B, H, L, hd]."""
    B, _, L, _ = q.shape
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
    if prefix is not None:
        pk, pv = (t.to(q.dtype).transpose(0, 1)[None].expand(B, -1, -1, -1) for t in prefix)  # [B, Hkv, P, hd] views
        parts.append(attention_lse(q, pk, pv, None))
    return merge_lse(parts).to(q.dtype)


def _rows_over_views(q: Tensor, kv: PagedKV) -> tuple[Tensor, Tensor]:
    """Per row, per run of pages: the fused kernel over a view of the pool; -> (out [B, H, L,
    hd], lse [B, H, L] float32)."""
    ps, mask = kv.k.shape[1], kv.mask
    outs, lses = [], []
    for r, runs in enumerate(kv.runs):
        qr, q_index = q[r:r + 1], None if mask.q_index is None else mask.q_index[r]  # [1, H, Lr, hd], [Lr]
        if kv.segments is not None:
            offset, count = kv.segments[r]
            qr, q_index = q[:, :, offset:offset + count], q_index[:count]
        parts = []
        for page, start, n in runs:
            pages = slice(page, page + -(-n // ps))  # the run's pages
            k = kv.k[pages].flatten(0, 1)[:n].transpose(0, 1)[None]  # [1, Hkv, n, hd] a view
            v = kv.v[pages].flatten(0, 1)[:n].transpose(0, 1)[None]
            m = None
            if not mask.keys_only:
                rows = torch.tensor([r], device=q.device)
                seen = mask.visible(rows[:, None], q_index[:, None], torch.arange(start, start + n,
                                                                                  device=q.device)[None])
                m = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, -torch.inf)[None, None]
            o, lse = attention_lse(qr, k, v, m)
            if m is not None:  # a query that sees none of this run's keys (a later block): no weight, no NaN
                o = o.masked_fill(~torch.isfinite(lse)[..., None], 0)
            parts.append((o, lse))
        o, lse = merge_lse(parts, keep_lse=True) if len(parts) > 1 else parts[0]
        outs.append(o)
        lses.append(lse)
    dim = 0 if kv.segments is None else 2  # rows stacked, or packed queries in their order
    return torch.cat(outs, dim), torch.cat(lses, dim)


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
