"""The SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, under the HF names
(``gate_proj``, ``up_proj``, ``down_proj``) that LLaDA-MoE, LLaDA 2.x and Dream use. LLaDA
1.x names its three matrices differently and calls ``swiglu`` on them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model.layers.linear import TPGroup, column, row


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    return down(F.silu(gate(x)) * up(x))


class GatedMLP(nn.Module):
    """With ``tp``: this rank's ``hidden`` columns (column-parallel gate/up, row-parallel down;
    ``what`` names the config field that must divide; ``reduce=False``: the partial sum, for
    the caller to all-reduce with others)."""

    def __init__(self, dim: int, hidden: int, tp: TPGroup | None = None, what: str = "intermediate_size",
                 reduce: bool = True) -> None:
        super().__init__()
        self.gate_proj = column(dim, hidden, tp, what)
        self.up_proj = column(dim, hidden, tp, what)
        self.down_proj = row(hidden, dim, tp, what, reduce=reduce)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
