"""The SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, under the HF names
(``gate_proj``, ``up_proj``, ``down_proj``) that LLaDA-MoE, LLaDA 2.x and Dream use. LLaDA
1.x names its three matrices differently and calls ``swiglu`` on them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    return down(F.silu(gate(x)) * up(x))


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
