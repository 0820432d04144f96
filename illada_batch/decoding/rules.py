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
from illada_batch.decoding.params import SamplingParams
from illada_batch.decoding.sampler import confidence, select_transfer, transfer_count

Generators = list[torch.Generator]


@dataclass(frozen=True)
class StepRules:
    # (logits [b, K, V], chosen tokens [b, K], params, generators) -> scores [b, K] float32
    confidence: Callable[[Tensor, Tensor, SamplingParams, Generators], Tensor]
    # (scores [b, K] (-inf where not masked), masked [b, K], step in block [b], params, generators) -> fill [b, K]
    transfer: Callable[[Tensor, Tensor, Tensor, SamplingParams, Generators], Tensor]
    lowest: float  # a score below every real one (``zero_eos_confidence`` gives it to EOS)


LLADA = StepRules(
    confidence=lambda logits, tokens, p, gens: confidence(logits, tokens, p.remasking, gens),
    transfer=lambda conf, is_mask, step, p, gens: select_transfer(
        conf, transfer_count(is_mask.sum(-1), p.steps_per_block - step), p.threshold),
    lowest=0.0,
)

DREAM = StepRules(
    confidence=lambda logits, tokens, p, gens: dream_sampler.dream_confidence(logits, tokens, p.alg, p.temperature),
    transfer=lambda conf, is_mask, step, p, gens: dream_sampler.dream_transfer(
        conf, is_mask, step, p.steps_per_block, p.alg, p.alg_temp, gens),
    lowest=dream_sampler.LOWEST,
)


def rules_for(params: SamplingParams) -> StepRules:
    return LLADA if params.alg is None else DREAM
