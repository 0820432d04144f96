"""The one decoding loop of the diffusion sampler.

Design note. A ``DecodeBatch`` holds the rows in flight as left-padded tensors
``[pad | prompt | response]`` with per-row RoPE positions (a row's first real token is at
position 0, or right after the cached prefix), so padding never changes a row's result.
Each row carries its own block index, step counter and random generator, so rows that
joined the batch at different times (continuous batching) decode side by side.
A row's response starts all masked, or laid out by a response template (fixed text and
masked slots, ``decoding/template.py``): the template is data in the batch (the first
response tokens and ``slot``, each position's slot), not a second loop. A step unmasks
masked positions only, so fixed text never changes; a block's transfer count counts its
masked positions only, and a block with none is skipped.
``denoise_step`` is one forward pass (one NFE) plus the per-row unmasking; ``generate``
loops it over one batch; the engine loops it while refilling finished rows. The cache is
a parameter (``forward``: how a step's logits for the current block are computed), never a
second loop. Logits are computed for the current block's positions only (the only ones a
step reads), which gives the same tokens as full logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from illada_batch.decoding.params import SamplingParams
from illada_batch.decoding.rules import rules_for
from illada_batch.decoding.sampler import gumbel_argmax
from illada_batch.model.base import DiffusionLM
from illada_batch.model.layers.attention import LayerKV, isolated_prefix_mask


@dataclass
class DecodeBatch:
    x: Tensor  # [B, L] tokens: pad | prompt | response (the last gen_length columns)
    valid: Tensor  # [B, L] bool, False on left padding
    positions: Tensor  # [B, L] RoPE positions
    prefix_end: Tensor  # [B] column where a row's isolated prefix ends (0 = none)
    block: Tensor  # [B] current block per row
    step: Tensor  # [B] steps taken in the current block
    nfe: Tensor  # [B] forward passes this row has cost
    done: Tensor  # [B] bool
    generators: list[torch.Generator]
    tags: list = field(default_factory=list)  # the caller's handle per row (request ids)
    # Block cache: each row's K/V pages in its token order (its first real token first),
    # right-padded with page 0 (never read: masked); None without a block cache.
    page_table: Tensor | None = None  # [B, max pages]
    # Each response position's slot: 0 everywhere for a row without a template (its whole
    # response is one slot); a template's slot index, -1 on its fixed text and EOS tail.
    slot: Tensor | None = None  # [B, gen_length]

    @property
    def size(self) -> int:
        return self.x.shape[0]

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], params: SamplingParams, mask_id: int, pad_id: int,
                     generators: list[torch.Generator], device: torch.device, position_offset: int = 0,
                     prefix_lengths: list[int] | None = None, tags: list | None = None,
                     page_tables: list[list[int]] | None = None,
                     responses: list[tuple[list[int], list[int]] | None] | None = None) -> "DecodeBatch":
        """``responses``: per row None (all masked) or a template's (first response ids,
        slot per position), from ``TokenTemplate.layout``."""
        B, G = len(prompts), params.gen_length
        L = max(len(p) for p in prompts) + G
        x = torch.full((B, L), pad_id, dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        for i, p in enumerate(prompts):
            x[i, L - G - len(p):L - G] = torch.tensor(p, dtype=torch.long)
            valid[i, L - G - len(p):] = True
        x[:, L - G:] = mask_id
        slot = torch.zeros((B, G), dtype=torch.long)
        for i, r in enumerate(responses or []):
            if r is not None:
                x[i, L - G:], slot[i] = torch.tensor(r[0], dtype=torch.long), torch.tensor(r[1], dtype=torch.long)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + position_offset
        pad = L - G - torch.tensor([len(p) for p in prompts])
        prefix_end = pad + torch.tensor(prefix_lengths) if prefix_lengths else torch.zeros(B, dtype=torch.long)
        def zeros() -> Tensor:
            return torch.zeros(B, dtype=torch.long, device=device)

        table = None
        if page_tables is not None:
            table = torch.zeros((B, max(map(len, page_tables))), dtype=torch.long)
            for i, t in enumerate(page_tables):
                table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            table = table.to(device)
        block = first_masked_block(x[:, L - G:] == mask_id, params).to(device)  # [B] a template may skip blocks
        return cls(x.to(device), valid.to(device), positions.to(device), prefix_end.to(device), block,
                   zeros(), zeros(), torch.zeros(B, dtype=torch.bool, device=device),
                   list(generators), list(tags) if tags is not None else list(range(B)), table, slot.to(device))

    def select(self, keep: Tensor) -> "DecodeBatch":
        """The rows where ``keep`` [B] is True, with left padding trimmed to the longest."""
        idx = keep.nonzero().squeeze(-1)
        valid = self.valid[idx]
        first = int((~valid).sum(-1).min()) if len(idx) else 0
        trim = slice(first, None)
        return DecodeBatch(self.x[idx, trim], valid[:, trim], self.positions[idx, trim], self.prefix_end[idx] - first,
                           self.block[idx], self.step[idx], self.nfe[idx], self.done[idx],
                           [self.generators[i] for i in idx.tolist()], [self.tags[i] for i in idx.tolist()],
                           None if self.page_table is None else self.page_table[idx],
                           None if self.slot is None else self.slot[idx])

    def extend(self, other: "DecodeBatch", pad_id: int) -> "DecodeBatch":
        """Both batches' rows, left-padded to a common length."""
        L = max(self.x.shape[1], other.x.shape[1])

        def lpad(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (L - t.shape[1], 0), value=value)

        cat = torch.cat
        table = None
        if self.page_table is not None:
            n = max(self.page_table.shape[1], other.page_table.shape[1])
            table = cat([torch.nn.functional.pad(t, (0, n - t.shape[1])) for t in (self.page_table, other.page_table)])
        return DecodeBatch(
            cat([lpad(self.x, pad_id), lpad(other.x, pad_id)]), cat([lpad(self.valid, False), lpad(other.valid, False)]),
            cat([lpad(self.positions, 0), lpad(other.positions, 0)]),
            cat([self.prefix_end + L - self.x.shape[1], other.prefix_end + L - other.x.shape[1]]),
            cat([self.block, other.block]), cat([self.step, other.step]), cat([self.nfe, other.nfe]),
            cat([self.done, other.done]), self.generators + other.generators, self.tags + other.tags, table,
            None if self.slot is None else cat([self.slot, other.slot]))

    def attention_mask(self, isolate_prefix: bool) -> Tensor:
        """[B, L] key padding, or [B, L, L] when each row's prefix attends only to itself."""
        return isolated_prefix_mask(self.valid, self.prefix_end) if isolate_prefix else self.valid


class FullForward:
    """A step's forward over each row's whole sequence: ``[prefix | prompt | response]``
    (cache off; ``isolate_prefix``: the prefix attends only to itself), or ``[prompt |
    response]`` also attending to a shared prefix's cached K/V (``prefix_kv``). The loop
    takes any object with this ``block_logits``: that object is the cache."""

    def __init__(self, prefix_kv: list[LayerKV] | None = None, isolate_prefix: bool = False) -> None:
        self.prefix_kv, self.isolate_prefix = prefix_kv, isolate_prefix
        self.query_tokens = 0  # query positions run (padding included)

    def block_logits(self, model: DiffusionLM, batch: "DecodeBatch", rows: Tensor, cols: Tensor,
                     params: SamplingParams) -> Tensor:
        """Logits [b, BL, V] at the current block's columns ``cols`` [b, BL] of ``rows`` [b]."""
        x, valid, L = batch.x[rows], batch.valid[rows], batch.x.shape[1]
        attn = batch.attention_mask(self.isolate_prefix)[rows]  # [b, L] or [b, L, L]
        positions, index = batch.positions[rows], cols  # [b, L], [b, BL]
        inputs = x
        if params.cfg_scale > 0:  # the unconditional copy: the whole prompt masked
            prompt = valid.clone()
            prompt[:, L - params.gen_length:] = False
            inputs = torch.cat([x, torch.where(prompt, model.card.mask_token_id, x)])  # [2b, L]
            attn, positions, index = torch.cat([attn, attn]), torch.cat([positions, positions]), torch.cat([cols, cols])
        self.query_tokens += inputs.numel()
        logits = model.run(inputs, attention_mask=attn, positions=positions, prefix_kv=self.prefix_kv,
                           logits_index=index).logits  # [b or 2b, BL, V]
        if params.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (params.cfg_scale + 1) * (cond - uncond)
        return logits


def denoise_step(model: DiffusionLM, batch: DecodeBatch, params: SamplingParams, forward: FullForward | None = None) -> None:
    """One forward pass for the unfinished rows (through ``forward``, the cache; default:
    the whole sequence), then each row unmasks its chosen positions of the current block."""
    card = model.card
    mask_id, G, BL = card.mask_token_id, params.gen_length, params.block_length
    rows = (~batch.done).nonzero().squeeze(-1)  # finished rows cost nothing
    if len(rows) == 0:
        return
    x, L = batch.x[rows], batch.x.shape[1]
    cols = (L - G) + batch.block[rows][:, None] * BL + torch.arange(BL, device=x.device)  # [b, BL] current block
    logits = (forward or FullForward()).block_logits(model, batch, rows, cols, params)  # [b, BL, V]
    if params.suppress_eos:
        logits[..., card.eos_token_id] = -torch.inf
    gens = [batch.generators[i] for i in rows.tolist()]
    current = x.gather(1, cols)  # [b, BL]
    is_mask = current == mask_id
    # [MASK] is never an output: a position that kept predicting it would never be filled.
    # Confidences still come from every token's logit, as the reference computes them.
    mask_logit = logits[..., mask_id].clone()  # [b, BL]
    logits[..., mask_id] = -torch.inf
    tokens = gumbel_argmax(logits, params.temperature, gens)  # [b, BL]
    logits[..., mask_id] = mask_logit
    rules = rules_for(params)
    conf = rules.confidence(logits, tokens, params, gens)  # [b, BL] float32
    if params.zero_eos_confidence:
        eot = getattr(model.tokenizer, "eot_id", None)
        stop = (tokens == card.eos_token_id) | ((tokens == eot) if eot is not None else False)
        conf = torch.where(stop, torch.full_like(conf, rules.lowest), conf)
    conf = torch.where(is_mask, conf, -torch.inf)
    # A block ends after its scheduled steps whatever the scores (NaN logits, say): its last
    # step fills every position still masked (threshold: at most block_length steps).
    last = batch.step[rows] >= (params.steps_per_block if params.threshold is None else BL) - 1  # [b]
    transfer = rules.transfer(conf, is_mask, batch.step[rows], params, gens) | (is_mask & last[:, None])  # [b, BL]
    batch.x[rows[:, None], cols] = torch.where(transfer, tokens, current)
    _advance(batch, rows, params, mask_id, card.eos_token_id)


def _advance(batch: DecodeBatch, rows: Tensor, params: SamplingParams, mask_id: int, eos_id: int) -> None:
    """Count the step; with early stop, end each slot at its EOS; move each row to its first
    block still masked (a block with nothing masked completes at once): done past the last."""
    G = params.gen_length
    batch.nfe[rows] += 1
    batch.step[rows] += 1
    resp = batch.x[rows, -G:]  # [b, G]
    if params.early_stop:
        slot = batch.slot[rows] if batch.slot is not None else torch.zeros_like(resp)  # [b, G]
        resp = end_slots_at_eos(resp, slot, mask_id, eos_id)
        batch.x[rows, -G:] = resp
    block = first_masked_block(resp == mask_id, params)  # [b]
    batch.step[rows] = torch.where(block == batch.block[rows], batch.step[rows], 0)
    batch.block[rows] = block
    batch.done[rows] = block >= params.num_blocks


def first_masked_block(is_mask: Tensor, params: SamplingParams) -> Tensor:
    """[B] index of each row's first block with a masked position; ``num_blocks`` if none.
    is_mask [B, gen_length]."""
    has = is_mask.view(is_mask.shape[0], params.num_blocks, params.block_length).any(-1)  # [B, blocks]
    return torch.where(has.any(-1), has.float().argmax(-1), params.num_blocks)


def end_slots_at_eos(resp: Tensor, slot: Tensor, mask_id: int, eos_id: int) -> Tensor:
    """Early stop, per slot: once a slot's text up to its first EOS is final (nothing masked
    before that EOS), the rest of the slot becomes EOS, so its remaining positions cost no
    steps. A row without a template is one slot: its response ends at its first EOS.
    resp, slot [B, G] (slot -1: fixed text, never changed) -> resp [B, G]."""
    in_slot = slot >= 0
    is_eos = (resp == eos_id) & in_slot
    eos_seen = _slot_cumsum(is_eos, slot)  # [B, G] EOS at or before each position, in its slot
    masked_first = _slot_cumsum((resp == mask_id) & (eos_seen == 0), slot)  # masks before the slot's first EOS
    after = in_slot & (eos_seen - is_eos.long() >= 1) & (masked_first == 0)  # [B, G]
    return torch.where(after, eos_id, resp)


def _slot_cumsum(v: Tensor, slot: Tensor) -> Tensor:
    """Cumulative sum of ``v`` [B, G] restarted at each run of equal ``slot`` values."""
    v = v.long()
    total = v.cumsum(-1)  # [B, G]
    start = torch.ones_like(slot, dtype=torch.bool)
    start[:, 1:] = slot[:, 1:] != slot[:, :-1]  # [B, G] first position of each run
    where = torch.arange(slot.shape[1], device=slot.device).expand_as(slot)
    run_start = torch.where(start, where, 0).cummax(-1).values  # [B, G]
    return total - (total - v).gather(-1, run_start)


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate(model: DiffusionLM, prompt_ids: Tensor, attention_mask: Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", seed: int | list[int] | None = None, early_stop: bool = False,
             **options) -> Tensor:
    """DiffusionLM's reference ``generate()``: its call shape and its defaults (128 steps, no early
    stop: every response position is decoded), which differ from ``SamplingParams``' (the
    engine's and the job's). Prompt ids [B, Lp] (left padded, with an ``attention_mask`` when
    rows differ in length) -> ids [B, Lp + gen_length].

    ``options``: the other ``SamplingParams`` fields (threshold, suppress_eos,
    zero_eos_confidence). ``seed``: one per row or one for all rows
    (row i gets seed + i); default: drawn from torch's global generator.
    """
    params = SamplingParams(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                            cfg_scale=cfg_scale, remasking=remasking, early_stop=early_stop, **options)
    card = model.card
    B = prompt_ids.shape[0]
    mask = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompts = [row[m].tolist() for row, m in zip(prompt_ids.cpu(), mask.cpu())]
    if seed is None:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    else:
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(B)]
    batch = DecodeBatch.from_prompts(prompts, params, card.mask_token_id, card.pad_token_id,
                                     row_generators(seeds, model.device), model.device)
    while not bool(batch.done.all()):
        denoise_step(model, batch, params)
    out = torch.cat([prompt_ids.to(model.device), batch.x[:, -gen_length:]], dim=1)
    return out
