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

Block-causal families (LLaDA 2.x) align blocks at position 0, not at the response's start:
a row's decoding window then starts at its prompt's last block boundary and ends at a block
boundary past ``gen_length``. The window holds the prompt's partial last block as fixed
tokens (``lead``, never unmasked or edited, as a template's fixed text), the response, and the
last block's tail past ``gen_length`` (masked and decoded, as the reference does; a row
whose prompt ends on a boundary gets a fixed filler block instead, never decoded). Every
window is ``gen_length + block_length`` wide, so rows of any prompt length share a batch;
the loop reads blocks, masks and EOS inside the window, and ``responses`` cuts each row's
``gen_length`` tokens out of it. A family's sampler rules are data of ``SamplingParams``
(``transfer_rule``; LLaDA 2.1's ``editing_threshold`` and ``max_post_steps``), not a second
loop: with editing, a row stays in a block after it is unmasked while its passes edit (at
most ``max_post_steps``), and its EOS ends generation only once its block is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from illada_batch.decoding.params import SamplingParams
from illada_batch.decoding.rules import rules_for
from illada_batch.decoding.sampler import edits, gumbel_argmax
from illada_batch.model.base import DiffusionLM
from illada_batch.model.family import AttentionKind
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
    # Each window position's slot: 0 everywhere for a row without a template (its whole
    # response is one slot); a template's slot index, -1 on its fixed text and EOS tail (and
    # on a block-causal row's prompt tokens and filler block).
    slot: Tensor | None = None  # [B, W]
    # Block-causal rows: the prompt tokens at the start of the window; 0 otherwise.
    lead: Tensor | None = None  # [B]
    post: Tensor | None = None  # [B] editing passes since the current block was unmasked

    @property
    def window(self) -> int:
        """W, the decoding window's width: the last W columns (gen_length, or gen_length +
        block_length for block-causal rows)."""
        return self.slot.shape[1]

    @property
    def size(self) -> int:
        return self.x.shape[0]

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], params: SamplingParams, mask_id: int, pad_id: int,
                     generators: list[torch.Generator], device: torch.device, position_offset: int = 0,
                     prefix_lengths: list[int] | None = None, tags: list | None = None,
                     page_tables: list[list[int]] | None = None,
                     responses: list[tuple[list[int], list[int]] | None] | None = None,
                     aligned: bool = False) -> "DecodeBatch":
        """``responses``: per row None (all masked) or a template's (first response ids,
        slot per position), from ``TokenTemplate.layout``. ``aligned``: blocks aligned at
        position 0 (block-causal families; see the design note)."""
        B = len(prompts)
        windows = [_window(p, params, mask_id, pad_id, position_offset, aligned, None if not responses else responses[i])
                   for i, p in enumerate(prompts)]
        prompts = [p[:len(p) - lead] for p, (lead, _, _) in zip(prompts, windows)]
        W = len(windows[0][1])
        L = max(len(p) for p in prompts) + W
        x = torch.full((B, L), pad_id, dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        slot = torch.zeros((B, W), dtype=torch.long)
        for i, (p, (_, ids, slots)) in enumerate(zip(prompts, windows)):
            x[i, L - W - len(p):L - W] = torch.tensor(p, dtype=torch.long)
            valid[i, L - W - len(p):] = True
            x[i, L - W:], slot[i] = torch.tensor(ids, dtype=torch.long), torch.tensor(slots, dtype=torch.long)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + position_offset
        pad = L - W - torch.tensor([len(p) for p in prompts])
        prefix_end = pad + torch.tensor(prefix_lengths) if prefix_lengths else torch.zeros(B, dtype=torch.long)
        def zeros() -> Tensor:
            return torch.zeros(B, dtype=torch.long, device=device)

        table = None
        if page_tables is not None:
            table = torch.zeros((B, max(map(len, page_tables))), dtype=torch.long)
            for i, t in enumerate(page_tables):
                table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            table = table.to(device)
        block = first_masked_block(x[:, L - W:] == mask_id, params).to(device)  # [B] a template may skip blocks
        lead = torch.tensor([w[0] for w in windows], dtype=torch.long, device=device)
        return cls(x.to(device), valid.to(device), positions.to(device), prefix_end.to(device), block,
                   zeros(), zeros(), torch.zeros(B, dtype=torch.bool, device=device),
                   list(generators), list(tags) if tags is not None else list(range(B)), table, slot.to(device),
                   lead, zeros())

    def responses(self, params: SamplingParams) -> list[list[int]]:
        """Each row's ``gen_length`` response tokens, cut out of its window."""
        window, lead = self.x[:, -self.window:].tolist(), self.lead.tolist()
        return [w[s:s + params.gen_length] for w, s in zip(window, lead)]

    def response_slots(self, params: SamplingParams) -> list[list[int]]:
        slot, lead = self.slot.tolist(), self.lead.tolist()
        return [w[s:s + params.gen_length] for w, s in zip(slot, lead)]

    def select(self, keep: Tensor) -> "DecodeBatch":
        """The rows where ``keep`` [B] is True, with left padding trimmed to the longest."""
        idx = keep.nonzero().squeeze(-1)
        valid = self.valid[idx]
        first = int((~valid).sum(-1).min()) if len(idx) else 0
        trim = slice(first, None)
        return DecodeBatch(self.x[idx, trim], valid[:, trim], self.positions[idx, trim], self.prefix_end[idx] - first,
                           self.block[idx], self.step[idx], self.nfe[idx], self.done[idx],
                           [self.generators[i] for i in idx.tolist()], [self.tags[i] for i in idx.tolist()],
                           None if self.page_table is None else self.page_table[idx], self.slot[idx], self.lead[idx],
                           self.post[idx])

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
            cat([self.slot, other.slot]), cat([self.lead, other.lead]), cat([self.post, other.post]))

    def attention_mask(self, isolate_prefix: bool, causal_block: int | None = None) -> Tensor:
        """[B, L] key padding, or [B, L, L] when each row's prefix attends only to itself or
        attention is block-causal (``causal_block``: a position sees the blocks of that size,
        aligned at position 0, up to its own)."""
        mask = isolated_prefix_mask(self.valid, self.prefix_end) if isolate_prefix else self.valid
        if causal_block is None:
            return mask
        blk = self.positions // causal_block  # [B, L]
        sees = blk[:, None, :] <= blk[:, :, None]  # [B, L(q), L(k)]
        return (mask if mask.dim() == 3 else mask[:, None, :]) & sees


def _window(prompt: list[int], params: SamplingParams, mask_id: int, pad_id: int, position_offset: int,
            aligned: bool, response: tuple[list[int], list[int]] | None) -> tuple[int, list[int], list[int]]:
    """A row's decoding window: (lead, token ids, slots). Not aligned: the response (all
    masked, or a template's layout). Aligned: the prompt's last ``lead`` tokens (fixed, slot
    -1), the response, then the last block's tail (masked, in the response's last slot) or,
    when the prompt ends on a block boundary, a filler block (fixed, never decoded)."""
    G, BL = params.gen_length, params.block_length
    ids, slots = response if response is not None else ([mask_id] * G, [0] * G)
    if not aligned:
        return 0, list(ids), list(slots)
    lead = (position_offset + len(prompt)) % BL
    if lead:
        tail, tail_slots = [mask_id] * (BL - lead), [max(slots[-1], 0)] * (BL - lead)
    else:
        tail, tail_slots = [pad_id] * BL, [-1] * BL
    return lead, prompt[len(prompt) - lead:] + list(ids) + tail, [-1] * lead + list(slots) + tail_slots


class Forward:
    """The cache parameter of ``denoise_step``: how a step's logits for the current block are
    computed. A forward gives ``block_logits`` for every row it is handed; one that may also
    run rows without decoding them (chunked prefill) overrides ``step_logits``."""

    query_tokens = 0  # query positions run

    def block_logits(self, model: DiffusionLM, batch: "DecodeBatch", rows: Tensor, cols: Tensor,
                     params: SamplingParams) -> Tensor:
        """Logits [b, BL, V] at the current block's columns ``cols`` [b, BL] of ``rows`` [b]."""
        raise NotImplementedError

    def step_logits(self, model: DiffusionLM, batch: "DecodeBatch", rows: Tensor, cols: Tensor,
                    params: SamplingParams) -> tuple[Tensor, Tensor]:
        """(logits [d, BL, V], decoding [d]): the logits of the rows of ``rows`` that decode this
        step, and which those are (indices into ``rows``); the others ran without choosing a
        token (no step counted). Default: every row decodes."""
        return self.block_logits(model, batch, rows, cols, params), torch.arange(len(rows), device=rows.device)


class FullForward(Forward):
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
        attn = batch.attention_mask(self.isolate_prefix, causal_block(model, params))[rows]  # [b, L] or [b, L, L]
        positions, index = batch.positions[rows], cols  # [b, L], [b, BL]
        inputs = x
        if params.cfg_scale > 0:  # the unconditional copy: the whole prompt masked
            prompt = valid.clone()
            col = torch.arange(L, device=x.device)
            prompt &= col[None] < (L - batch.window + batch.lead[rows])[:, None]
            inputs = torch.cat([x, torch.where(prompt, model.card.mask_token_id, x)])  # [2b, L]
            attn, positions, index = torch.cat([attn, attn]), torch.cat([positions, positions]), torch.cat([cols, cols])
        self.query_tokens += inputs.numel()
        logits = model.run(inputs, attention_mask=attn, positions=positions, prefix_kv=self.prefix_kv,
                           logits_index=index).logits  # [b or 2b, BL, V]
        if params.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (params.cfg_scale + 1) * (cond - uncond)
        return logits


def denoise_step(model: DiffusionLM, batch: DecodeBatch, params: SamplingParams, forward: Forward | None = None) -> None:
    """One forward pass for the unfinished rows (through ``forward``, the cache; default:
    the whole sequence), then each row that decoded unmasks its chosen positions of the
    current block (a row the forward only prefilled keeps its block, step and generator)."""
    card = model.card
    mask_id, W, BL = card.mask_token_id, batch.window, params.block_length
    rows = (~batch.done).nonzero().squeeze(-1)  # finished rows cost nothing
    if len(rows) == 0:
        return
    L = batch.x.shape[1]
    cols = (L - W) + batch.block[rows][:, None] * BL + torch.arange(BL, device=rows.device)  # [b, BL] current block
    logits, decoding = (forward or FullForward()).step_logits(model, batch, rows, cols, params)  # [d, BL, V], [d]
    if len(decoding) < len(rows):  # the others only prefilled: no token chosen, no step counted
        if not len(decoding):
            return
        rows, cols = rows[decoding], cols[decoding]
    x = batch.x[rows]
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
    edited = torch.zeros_like(is_mask)
    if params.editing:  # LLaDA 2.1: decoded tokens (not fixed text, not the prompt) may be replaced
        editable = ~is_mask & (batch.slot[rows].gather(1, cols - (L - W)) >= 0)  # [b, BL]
        edited = edits(tokens, current, conf, editable, params.editing_threshold)  # [b, BL]
    conf = torch.where(is_mask, conf, -torch.inf)
    # A block ends after its scheduled steps whatever the scores (NaN logits, say): its last
    # step fills every position still masked (threshold: at most block_length steps).
    last = batch.step[rows] >= rules.last_step(params) - 1  # [b]
    fill = rules.transfer(conf, is_mask, batch.step[rows], params, gens)  # [b, BL]
    transfer = fill | (is_mask & last[:, None]) | edited  # [b, BL]
    batch.x[rows[:, None], cols] = torch.where(transfer, tokens, current)
    _advance(batch, rows, params, mask_id, card.eos_token_id, is_mask.any(-1), edited.any(-1))


def _advance(batch: DecodeBatch, rows: Tensor, params: SamplingParams, mask_id: int, eos_id: int,
             had_masks: Tensor, edited: Tensor) -> None:
    """Count the step; with early stop, end each slot at its EOS; move each row to its first
    block still masked (a block with nothing masked completes at once): done past the last.
    With editing (LLaDA 2.1), a row stays in its block after it is unmasked while its passes
    edit, at most ``max_post_steps`` passes; its slots end at EOS only when it leaves the block.
    had_masks, edited [b]: this step began with masked positions in the block, replaced tokens."""
    W = batch.window
    batch.nfe[rows] += 1
    batch.step[rows] += 1
    resp = batch.x[rows, -W:]  # [b, W]
    stay = torch.zeros_like(had_masks)
    if params.editing:
        post = batch.post[rows] + (~had_masks).long()  # [b] passes that began unmasked
        still = (resp.view(len(rows), -1, params.block_length) == mask_id).any(-1).gather(
            1, batch.block[rows][:, None]).squeeze(1)  # [b]
        stay = torch.where(had_masks, still | (params.max_post_steps > 0), edited & (post < params.max_post_steps))
        batch.post[rows] = torch.where(stay, post, 0)
    if params.early_stop:
        ended = end_slots_at_eos(resp, batch.slot[rows], mask_id, eos_id)
        resp = torch.where(stay[:, None], resp, ended)
        batch.x[rows, -W:] = resp
    block = torch.where(stay, batch.block[rows], first_masked_block(resp == mask_id, params))  # [b]
    batch.step[rows] = torch.where(block == batch.block[rows], batch.step[rows], 0)
    batch.block[rows] = block
    batch.done[rows] = block >= W // params.block_length


def first_masked_block(is_mask: Tensor, params: SamplingParams) -> Tensor:
    """[B] index of each row's first block with a masked position; the number of blocks if
    none. is_mask [B, W], W the window (a multiple of block_length)."""
    has = is_mask.view(is_mask.shape[0], -1, params.block_length).any(-1)  # [B, blocks]
    return torch.where(has.any(-1), has.float().argmax(-1), has.shape[1])


def causal_block(model: DiffusionLM, params: SamplingParams) -> int | None:
    """The block size of the model's block-causal attention (its card's, or the sampler's
    block_length when the card leaves it to the sampler); None when it is bidirectional."""
    card = model.card
    if card.attention is not AttentionKind.BLOCK_CAUSAL:
        return None
    return card.attention_block or params.block_length


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
    params = card.resolve(params)  # the family's own defaults for settings left unset
    B = prompt_ids.shape[0]
    mask = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompts = [row[m].tolist() for row, m in zip(prompt_ids.cpu(), mask.cpu())]
    if seed is None:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    else:
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(B)]
    batch = DecodeBatch.from_prompts(prompts, params, card.mask_token_id, card.pad_token_id,
                                     row_generators(seeds, model.device), model.device,
                                     aligned=causal_block(model, params) is not None)
    while not bool(batch.done.all()):
        denoise_step(model, batch, params)
    response = torch.tensor(batch.responses(params), dtype=torch.long, device=model.device)  # [B, gen_length]
    return torch.cat([prompt_ids.to(model.device), response], dim=1)
