"""Dream's sampler rules (its reference ``diffusion_generate``, HKUNLP/Dream
``generation_utils.py``) as pure functions the one decoding loop takes (``rules.py``).

Facts of the reference, followed here:
- Timesteps ``linspace(1, eps, steps + 1)`` in float32, ``eps = 1e-3``; step i goes from
  ``t = timesteps[i]`` to ``s = timesteps[i + 1]``.
- ``maskgit_plus``, ``topk_margin``, ``entropy``: a step fills ``int(M * (1 - s / t))`` of the M
  positions still masked (float32, truncated), and all of them at the last step: the most
  confident, or with ``alg_temp > 0`` drawn without replacement from
  ``softmax(confidence / alg_temp)``.
  Quirk, kept: with ``steps`` equal to the masked tokens the first step fills
  ``int(1 - eps) = 0`` tokens and the last step fills two.
- ``origin``: each masked position is filled with probability ``1 - s / t`` (one uniform
  draw per masked position, in position order), every one at the last step.
- Confidence from the tempered probabilities ``softmax(logits / temperature)`` (plain
  softmax at 0): ``maskgit_plus`` the chosen token's, ``topk_margin`` top-1 minus top-2,
  ``entropy`` ``sum p log(p + 1e-10)`` (the negative entropy: higher = surer).

Where the engine differs: M is each row's own masked count (the reference averages it over
the batch, so a row's schedule would depend on its neighbours); draws come from the row's
own generator; the loop never outputs [MASK] (``loop.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from illada_batch.decoding.params import Alg

EPS = 1e-3  # the reference's last timestep (its ``eps``)
LOWEST = torch.finfo(torch.float32).min  # below every score: entropy scores are negative


def fill_fraction(step: Tensor, steps: int) -> Tensor:
    """``1 - s / t`` for each row's step [b] on the reference's float32 timesteps; 1 at the
    last step (everything still masked)."""
    timesteps = torch.linspace(1, EPS, steps + 1, device=step.device)  # [steps + 1] float32
    i = step.clamp(max=steps - 1)
    t, s = timesteps[i], timesteps[i + 1]  # [b]
    return torch.where(i < steps - 1, 1 - s / t, torch.ones_like(t))


def fill_count(masked: Tensor, step: Tensor, steps: int) -> Tensor:
    """Tokens a step fills [b]: ``int(M * (1 - s / t))``, M = masked [b] (all at the last step)."""
    return (masked.float() * fill_fraction(step, steps)).floor().long()


def dream_confidence(logits: Tensor, tokens: Tensor, alg: Alg, temperature: float) -> Tensor:
    """Score of each prediction [B, K] float32 from logits [B, K, V] and the chosen tokens [B, K]."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    probs = torch.softmax(scaled, dim=-1)  # [B, K, V]
    if alg is Alg.TOPK_MARGIN:
        top = probs.topk(2, dim=-1).values  # [B, K, 2]
        return top[..., 0] - top[..., 1]
    if alg is Alg.ENTROPY:
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    return probs.gather(-1, tokens[..., None]).squeeze(-1)  # maskgit_plus (origin does not rank)


def dream_transfer(conf: Tensor, is_mask: Tensor, step: Tensor, steps: int, alg: Alg, alg_temp: float | None,
                   generators: list[torch.Generator]) -> Tensor:
    """Which positions to fill [B, K] bool. conf [B, K] (-inf where not masked), is_mask [B, K],
    step [B] each row's step in its block of ``steps``."""
    out = torch.zeros_like(is_mask)
    if alg is Alg.ORIGIN:
        p = fill_fraction(step, steps)  # [B]
        for b, g in enumerate(generators):
            where = is_mask[b].nonzero().squeeze(-1)
            draws = torch.rand(len(where), generator=g, device=conf.device)  # one per masked position, in order
            out[b, where] = draws < p[b]
        return out
    count = fill_count(is_mask.sum(-1), step, steps)  # [B]
    if not alg_temp:
        order = conf.argsort(dim=-1, descending=True, stable=True)  # [B, K]
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device)
                                                .expand_as(order))
        return is_mask & (rank < count[:, None])
    for b, g in enumerate(generators):
        weights = torch.softmax(conf[b] / alg_temp, dim=-1)  # [K] 0 where not masked
        k = min(int(count[b]), int((weights > 0).sum()))
        if k > 0:
            out[b, torch.multinomial(weights, k, generator=g)] = True
    return out & is_mask
