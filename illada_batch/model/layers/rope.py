"""Rotary position embedding: non-interleaved halves, in float32; partial rotary rotates
the first ``rotary_dim`` channels of each head and passes the rest through."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin for integer ``positions`` [B, L] -> two [B, 1, L, rotary_dim] float32 tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, rd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, rd]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, hd]; rotate the two halves of the first cos.shape[-1] channels in float32,
    return in x's dtype."""
    rd = cos.shape[-1]
    x32 = x.float()
    rot, rest = x32[..., :rd], x32[..., rd:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = rot * cos + rotated * sin
    return (out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)).to(x.dtype)
