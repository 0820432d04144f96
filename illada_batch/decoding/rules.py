"""A sampler's rules as data the one decoding loop takes: how a step scores its predictions
(``confidence``) and which masked positions it fills (``transfer``). LLaDA's reference rules
(low-confidence or random remasking, ``M // s`` a step, or a confidence threshold) unless
``SamplingParams.alg`` asks for Dream's (``dream_sampler.py``). The loop never asks which
family it runs: the settings pick the rules, and a family's card says which settings apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from illada_batch.decoding import dream_sampler
from illada_batch.decoding.params import SamplingParams, TransferRule
from illada_batch.decoding.sampler import block_schedule_count, confidence, select_transfer, transfer_count

Generators = list[torch.Generator]


@dataclass(frozen=True)
class StepRules:
    # (logits [b, K, V], chosen tokens [b, K], params, generators) -> scores [b, K] float32
    confidence: Callable[[Tensor, Tensor, SamplingParams, Generators], Tensor]
    # (scores [b, K] (-inf where not masked), masked [b, K], step in block [b], params, generators) -> fill [b, K]
    transfer: Callable[[Tensor, Tensor, Tensor, SamplingParams, Generators], Tensor]
    lowest: float  # a score below every real one (``zero_eos_confidence`` gives it to EOS)
    # params -> the step of a block at which whatever is still masked is filled (plus one)
    last_step: Callable[[SamplingParams], int]


def _llada_transfer(conf: Tensor, is_mask: Tensor, step: Tensor, p: SamplingParams, gens: Generators) -> Tensor:
    """LLaDA 1.x (``spread``: the block's masked positions over its steps left; under a
    threshold every prediction at or above it), LLaDA 2.0 (``block_schedule``: the block's
    fixed per-step counts; under a threshold every prediction above it when there are as
    many), LLaDA 2.1 (editing: one position a step at least, above the threshold)."""
    masked = is_mask.sum(-1)  # [b]
    if p.editing:
        return select_transfer(conf, torch.ones_like(masked), p.threshold, True)
    if p.transfer_rule is TransferRule.BLOCK_SCHEDULE:
        return select_transfer(conf, block_schedule_count(step, masked, conf.shape[1], p.steps_per_block),
                               p.threshold, True)
    return select_transfer(conf, transfer_count(masked, p.steps_per_block - step), p.threshold, False)


def _llada_last_step(p: SamplingParams) -> int:
    if p.editing:
        return p.block_length
    if p.transfer_rule is TransferRule.BLOCK_SCHEDULE or p.threshold is None:
        return p.steps_per_block
    return p.block_length


LLADA = StepRules(
    confidence=lambda logits, tokens, p, gens: confidence(logits, tokens, p.remasking, gens),
    transfer=_llada_transfer,
    lowest=0.0,
    last_step=_llada_last_step,
)

DREAM = StepRules(
    confidence=lambda logits, tokens, p, gens: dream_sampler.dream_confidence(logits, tokens, p.alg, p.temperature),
    transfer=lambda conf, is_mask, step, p, gens: dream_sampler.dream_transfer(
        conf, is_mask, step, p.steps_per_block, p.alg, p.alg_temp, gens),
    lowest=dream_sampler.LOWEST,
    last_step=lambda p: p.steps_per_block,
)


def rules_for(params: SamplingParams) -> StepRules:
    return LLADA if params.alg is None else DREAM
