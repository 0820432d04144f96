"""The block cache's forward (Fast-dLLM's DualCache semantics, for continuous batches).

Each row's own K/V live in pages of the engine's ``KVCache`` (its page table rides in
``DecodeBatch.page_table``). At a row's first step of a block (``batch.step == 0``) one
forward over the row's whole sequence writes every position's K/V into its pages and gives
that step's logits (a *refresh*). The block's other steps run only the block's tokens: their
queries attend to the row's cached K/V with the block's positions replaced by the block's
fresh K/V (so the cache before and after the block is reused, refreshed at each block
start). With the cache just computed from the same tokens, a block-only forward gives the
full forward's logits on the block (tested). A shared prefix's K/V (``prefix_kv``), when
given, are attended to by both kinds of forward.

A block-only step copies no row's cache: the block's fresh K/V are written into the row's
pages, then attention reads the pages in place through the page table
(``model/layers/paged_attention.py``). ``paged=False`` keeps the copying path (each row's
K/V gathered into a fresh tensor, the block's scattered into it): the reference the paged
path is tested against, and Fast-dLLM's dual cache in the roofline.

Packing. Rows at a block start (heavy: the whole sequence) and rows mid-block (light: the
block's tokens) are all served in every iteration, as two forwards: one over the heavy rows,
one over the light rows. Measured on tiny-llada (16 rows, gen 256, block 32, threshold 0.9,
1 thread, CPU time): a refresh cost 18 ms per row and a block-only step 2.8 ms per row, so
padding the light rows into the heavy forward would cost ~6x per light row in those
iterations; the alternative, one packed call, would save only the second call's fixed cost
(under 4.7 ms, a whole 32-token forward) in the 28 of 246 iterations that had both kinds:
at most 1% of the run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from illada_batch.decoding.loop import DecodeBatch, Forward
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.kv_cache import KVCache
from illada_batch.model.base import DiffusionLM
from illada_batch.model.layers import traffic
from illada_batch.model.layers.attention import LayerKV
from illada_batch.model.layers.paged_attention import AttnMask, PagedKV, plan_pages


class BlockCacheForward(Forward):
    """``denoise_step``'s forward for the block cache: refresh at a block's first step, the
    block's tokens only at its other steps."""

    def __init__(self, kv: KVCache, prefix_kv: list[LayerKV] | None = None, paged: bool = True) -> None:
        """``paged=False``: the block-only step gathers each row's K/V into a fresh tensor and
        scatters the block's into it (the path before paged attention, and Fast-dLLM's; kept
        as the reference the paged path is tested against and the roofline's Fast-dLLM row)."""
        self.kv, self.prefix_kv, self.paged = kv, prefix_kv, paged
        self.query_tokens = 0  # query positions run (padding included)

    def block_logits(self, model: DiffusionLM, batch: DecodeBatch, rows: Tensor, cols: Tensor,
                     params: SamplingParams) -> Tensor:
        """Logits [b, BL, V] at the current block's columns ``cols`` [b, BL] of ``rows`` [b]."""
        if params.cfg_scale > 0:
            raise ValueError("cfg_scale > 0: the block cache keeps no unconditional K/V; use cache 'off'")
        heavy = batch.step[rows] == 0  # [b] first step of the row's block
        parts = [(sel, run(model, batch, rows[sel], cols[sel]))
                 for sel, run in ((heavy.nonzero().squeeze(-1), self._refresh),
                                  ((~heavy).nonzero().squeeze(-1),
                                   self._block_only if self.paged else self._block_only_gathered)) if len(sel)]
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty(len(rows), *parts[0][1].shape[1:])  # [b, BL, V]
        for sel, logits in parts:
            out[sel] = logits
        return out

    def _refresh(self, model: DiffusionLM, batch: DecodeBatch, rows: Tensor, cols: Tensor) -> Tensor:
        """The rows' whole sequences: every position's K/V into their pages; block logits."""
        valid = batch.valid[rows]  # [h, L]
        first = int((~valid).sum(-1).min())  # left padding every one of these rows has
        valid, x, positions = valid[:, first:], batch.x[rows, first:], batch.positions[rows, first:]  # [h, L']
        ps = self.kv.page_size
        tok = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [h, L'] each column's token index in its row
        slots = (batch.page_table[rows].gather(1, tok // ps) * ps + tok % ps)[valid]  # [N] real tokens only

        def store(layer: int, k: Tensor, v: Tensor) -> LayerKV:  # k, v [h, Hkv, L', hd]
            self.kv.write_slots(layer, slots, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid])  # [N, Hkv, hd]
            return k, v

        self.query_tokens += x.numel()
        return model.run(x, attention_mask=valid, positions=positions, prefix_kv=self.prefix_kv,
                         logits_index=cols - first, kv_hook=store).logits  # [h, BL, V]

    def _block_only(self, model: DiffusionLM, batch: DecodeBatch, rows: Tensor, cols: Tensor) -> Tensor:
        """The block's tokens against the rows' pages, read in place: the block's fresh K/V are
        written into the pages first (the next refresh rewrites them anyway). With the card's
        logit shift, the positions just before the block run too (their states predict the
        block's first tokens), their K/V fresh and written as well."""
        shift = model.card.logit_shift
        cols = _with_shifted(cols, shift)  # [l, shift + BL]
        l, BL = cols.shape
        L, ps = batch.x.shape[1], self.kv.page_size
        length = batch.valid[rows].sum(-1)  # [l] tokens in each row
        table = batch.page_table[rows]  # [l, n]
        block_tok = cols - (L - length)[:, None]  # [l, BL] the block's token indices in its row
        slots = (table.gather(1, block_tok // ps) * ps + block_tok % ps).reshape(-1)  # [l * BL]
        mask = AttnMask(key_len=length)  # every block query sees the row's every token
        plan = plan_pages(table, mask, ps)  # once for every layer

        def attend_pages(layer: int, k: Tensor, v: Tensor) -> PagedKV:  # k, v [l, Hkv, BL, hd] fresh
            self.kv.write_slots(layer, slots, k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1))
            return PagedKV(self.kv.k[layer], self.kv.v[layer], table, mask, plan)

        self.query_tokens += l * BL
        return model.run(batch.x[rows].gather(1, cols), positions=batch.positions[rows].gather(1, cols),
                         prefix_kv=self.prefix_kv, kv_hook=attend_pages).logits[:, shift:]  # [l, block_length, V]

    def _block_only_gathered(self, model: DiffusionLM, batch: DecodeBatch, rows: Tensor, cols: Tensor) -> Tensor:
        """The block's tokens against a copy of the rows' cached K/V, the block's own K/V fresh
        (and, with the card's logit shift, those of the positions just before the block)."""
        shift = model.card.logit_shift
        cols = _with_shifted(cols, shift)  # [l, shift + BL]
        l, BL = cols.shape
        L, ps = batch.x.shape[1], self.kv.page_size
        length = batch.valid[rows].sum(-1)  # [l] tokens in each row
        T = -(-int(length.max()) // ps) * ps  # keys per row: whole pages
        table = batch.page_table[rows, :T // ps]  # [l, T / ps]
        block_tok = cols - (L - length)[:, None]  # [l, BL] the block's token indices in its row
        keys = torch.arange(T, device=cols.device)[None] < length[:, None]  # [l, T]
        arange_l = torch.arange(l, device=cols.device)[:, None]

        def attend_cache(layer: int, k: Tensor, v: Tensor) -> LayerKV:  # k, v [l, Hkv, BL, hd] fresh (BL: queries)
            ck, cv = self.kv.gather(layer, table)  # [l, T, Hkv, hd] each, a copy
            ck[arange_l, block_tok] = k.transpose(1, 2).to(ck.dtype)  # the block's K/V are this step's
            cv[arange_l, block_tok] = v.transpose(1, 2).to(cv.dtype)
            traffic.copied("scatter", l * BL)
            return ck.transpose(1, 2).to(k.dtype), cv.transpose(1, 2).to(v.dtype)  # [l, Hkv, T, hd]

        self.query_tokens += l * BL
        return model.run(batch.x[rows].gather(1, cols), attention_mask=keys[:, None, :].expand(l, BL, T),
                         positions=batch.positions[rows].gather(1, cols), prefix_kv=self.prefix_kv,
                         kv_hook=attend_cache).logits[:, shift:]  # [l, block_length, V]


def _with_shifted(cols: Tensor, shift: int) -> Tensor:
    """The block's columns [l, BL] with the ``shift`` columns just before it in front."""
    return torch.cat([cols[:, :1] + torch.arange(-shift, 0, device=cols.device), cols], dim=1)
