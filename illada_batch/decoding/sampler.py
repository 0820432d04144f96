"""The diffusion sampler's pure functions: transfer schedule, token choice, remasking.

These follow LLaDA's reference ``generate()``: in a block with M masked positions decoded
in s steps, step k unmasks ``M // s`` tokens plus one for the first ``M % s`` steps;
``low_confidence`` keeps the predictions whose softmax probability is highest, ``random``
keeps random ones; at temperature > 0 the token is the argmax of Gumbel-perturbed logits
computed in float64. Confidences are float32 or wider. Every random draw comes from the
row's own generator so a row's tokens never depend on its batch neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from illada_batch.decoding.params import Remasking


def transfer_count(masked: Tensor, steps_left: Tensor) -> Tensor:
    """This step's tokens to unmask [B]: ceil(masked / steps left). While every step unmasks
    its count, this is LLaDA's reference schedule for the block's masked count M at its
    start (``M // s`` a step, one more for the first ``M % s`` steps), computed for each row
    from its own masks; a template's fixed text is not masked, so not counted.
    masked [B] positions still masked in the block; steps_left [B] its steps left (>= 1)."""
    left = steps_left.clamp(min=1)
    return -(-masked // left)


def gumbel_argmax(logits: Tensor, temperature: float, generators: list[torch.Generator]) -> Tensor:
    """argmax of ``exp(logits) / (-log u) ** temperature`` in float64, u ~ U(0,1) per row.

    logits [B, K, V] -> tokens [B, K]. Equivalent to adding Gumbel(0, temperature) noise.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    B, K, V = logits.shape
    noise = torch.stack([torch.rand((K, V), generator=g, device=logits.device, dtype=torch.float64)
                         for g in generators])  # [B, K, V]
    perturbed = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature  # [B, K, V]
    return perturbed.argmax(dim=-1)


def confidence(logits: Tensor, tokens: Tensor, remasking: Remasking,
               generators: list[torch.Generator]) -> Tensor:
    """Score of each prediction [B, K] (float32): its probability, or a uniform draw."""
    if remasking is Remasking.LOW_CONFIDENCE:
        probs = torch.softmax(logits.float(), dim=-1)  # [B, K, V]
        return probs.gather(-1, tokens[..., None]).squeeze(-1)  # [B, K]
    B, K = tokens.shape
    return torch.stack([torch.rand(K, generator=g, device=tokens.device, dtype=torch.float32)
                        for g in generators])  # [B, K]


def block_schedule_count(step: Tensor, masked: Tensor, block_length: int, steps: int) -> Tensor:
    """LLaDA 2.0's count for step ``step`` [B] of a block: ``block_length`` spread over
    ``steps`` (``block_length // steps``, one more for the first ``block_length % steps``
    steps), capped at the ``masked`` [B] positions left. Its steps sum to block_length, so a
    block whose prompt fills part of it is unmasked in fewer steps."""
    n = block_length // steps + (step < block_length % steps).long()  # [B]
    return torch.minimum(n, masked)


def select_transfer(conf: Tensor, count: Tensor, threshold: float | None, floor: bool = False) -> Tensor:
    """Which positions to unmask [B, K] bool.

    conf [B, K] with -inf where nothing may be unmasked. Fixed schedule: the ``count[b]``
    most confident. Threshold: every position with conf >= threshold, and at least the
    most confident one; with ``floor`` (LLaDA 2.x) every position with conf > threshold, and
    at least the ``count[b]`` most confident.
    """
    order = conf.argsort(dim=-1, descending=True, stable=True)  # [B, K]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    allowed = torch.isfinite(conf)
    if threshold is None:
        return allowed & (rank < count[:, None])
    if floor:
        return allowed & ((conf > threshold) | (rank < count[:, None]))
    return allowed & ((conf >= threshold) | (rank == 0))


def edits(tokens: Tensor, current: Tensor, conf: Tensor, editable: Tensor, threshold: float) -> Tensor:
    """LLaDA 2.1's token editing [B, K] bool: an ``editable`` decoded position whose new
    prediction ``tokens`` differs from ``current`` with confidence above ``threshold``."""
    return editable & (tokens != current) & (conf > threshold)
