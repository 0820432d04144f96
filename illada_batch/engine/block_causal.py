"""The exact paged cache of block-causal families (LLaDA 2.x): served like an
autoregressive model, one block at a time.

With block-causal attention a token's K/V depend only on the tokens up to the end of its
block, so a block's K/V, once the block is complete, never change: the cache is exact, not
an approximation. Each row keeps ``cached``, the leading tokens whose final K/V are in its
pages (at first: the pages its complete prompt blocks hit in the pool, ``PagePool.allocate``
with ``block``). Each step runs, per row, the tokens from ``cached`` to the end of its
current block: at a row's first step its uncached complete prompt blocks (the prefill) and
its first block (with ``prefill_chunk``, a long prefill is spread over iterations, whole
blocks at a time, while the other rows keep decoding: ``engine/prefill.py``); at a block's first step the block just completed (its final tokens' K/V
written once, in the same forward, as dInfer's extra forward over a finished block does,
without the extra forward) and the new block; at the block's other steps the block alone.
Every query's K/V are written into the row's pages first, then attention reads the pages in
place under the block-causal mask (``model/layers/paged_attention.py``): a row never copies
its cache. After the step, everything before the current block is final: ``cached`` moves
to the block's start (after a prefill-only step, to the end of the blocks it prefilled).

Why not keep the last step's K/V of a block instead: they were computed from the block's
tokens before that step unmasked its last positions, so they differ from the final tokens'
K/V (and the tokens after them differ: measured in ``tests/test_block_causal.py``).

Continuous batching by block: rows prefilling, rows at a block's first step and rows
mid-block run different numbers of tokens, so their queries are packed into one sequence
(``PagedKV.segments``) and served by one forward per iteration, with no padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from illada_batch.decoding.loop import DecodeBatch, Forward
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.kv_cache import KVCache
from illada_batch.engine.prefill import PrefillSchedule
from illada_batch.model.base import DiffusionLM
from illada_batch.model.layers.paged_attention import AttnMask, PagedKV, plan_pages


class BlockCausalForward(Forward):
    """``denoise_step``'s forward for block-causal families: each row's uncached tokens up
    to the end of its current block, against its pages, packed into one forward; which
    tokens a row runs in an iteration (chunked prefill, waits for pages) is ``schedule``'s."""

    def __init__(self, kv: KVCache, block: int, page_size: int, prefill_chunk: int | None = None) -> None:
        self.kv, self.block = kv, block
        self.schedule = PrefillSchedule(block, page_size, prefill_chunk)
        self.query_tokens = 0  # query positions run (no padding: queries are packed)

    def step_logits(self, model: DiffusionLM, batch: DecodeBatch, rows: Tensor, cols: Tensor,
                    params: SamplingParams) -> tuple[Tensor, Tensor]:
        """Logits [d, BL, V] at the current block's columns ``cols`` [b, BL] of the rows of
        ``rows`` [b] that decode this iteration, and which those are (``decoding`` [d], indices
        into ``rows``); the others only prefill, or wait."""
        if params.cfg_scale > 0:
            raise ValueError("cfg_scale > 0: the block-causal cache keeps no unconditional K/V; use cache 'off'")
        if model.card.logit_shift:
            raise ValueError("the block-causal cache packs rows into one sequence, which a logit shift would cross")
        dev, ps, BL, L = cols.device, self.kv.page_size, cols.shape[1], batch.x.shape[1]
        pad = L - batch.valid[rows].sum(-1)  # [b] left padding of each row
        end = cols[:, -1] + 1 - pad  # [b] token index where each row's current block ends
        prompt_end = L - batch.window - pad  # [b] token index where each row's window starts
        index = [batch.tags[r][0] for r in rows.tolist()]
        spans = self.schedule.plan(list(zip(index, prompt_end.tolist(), end.tolist())))
        ran = [j for j, s in enumerate(spans) if s.stop > s.start]  # rows waiting for pages run nothing
        decoding = torch.tensor([j for j, s in enumerate(spans) if s.decodes], dtype=torch.long, device=dev)  # [d]
        rows = rows[ran]  # [r]
        start = torch.tensor([spans[j].start for j in ran], device=dev)  # [r]
        stop = torch.tensor([spans[j].stop for j in ran], device=dev)  # [r]
        pad, b = pad[ran], len(ran)
        count = stop - start  # [r] query tokens per row
        row_of = torch.repeat_interleave(torch.arange(b, device=dev), count)  # [N]
        offset = count.cumsum(0) - count  # [r] each row's first query in the packed sequence
        tok = torch.arange(int(count.sum()), device=dev) - offset[row_of] + start[row_of]  # [N] token index in its row
        col = tok + pad[row_of]  # [N] column in the batch
        table = batch.page_table[rows]  # [r, n]
        slots = table[row_of, tok // ps] * ps + tok % ps  # [N]
        q_index = (start[:, None] + torch.arange(int(count.max()), device=dev)).clamp(max=(stop - 1)[:, None])  # [r, longest]
        mask = AttnMask(key_len=stop, q_index=q_index, block=self.block)
        segments = list(zip(offset.tolist(), count.tolist()))
        plan = plan_pages(table, mask, ps, segments)  # once for every layer

        def attend_pages(layer: int, k: Tensor, v: Tensor) -> PagedKV:  # k, v [1, Hkv, N, hd]
            self.kv.write_slots(layer, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return PagedKV(self.kv.k[layer], self.kv.v[layer], table, mask, plan, segments)

        self.query_tokens += len(tok)
        last = torch.tensor([k for k, j in enumerate(ran) if spans[j].decodes], dtype=torch.long, device=dev)  # [d]
        logits_index = (offset + count - BL)[last][:, None] + torch.arange(BL, device=dev)  # [d, BL] the current block
        src = rows[row_of]  # [N] each query's batch row
        out = model.run(batch.x[src, col][None], positions=batch.positions[src, col][None], kv_hook=attend_pages,
                        logits_index=logits_index.reshape(1, -1), return_logits=len(decoding) > 0)
        if not len(decoding):  # every row prefilled or waited
            return torch.empty(0, BL, model.card.vocab_size, device=dev), decoding
        return out.logits.view(len(decoding), BL, -1), decoding  # [1, d * BL, V] -> [d, BL, V]
