"""Mixture of experts: the router (``route``, a pure function over gate logits) and the
experts (``Experts``, a ``ModuleList`` of SwiGLU MLPs under the HF names
``experts.<e>.{gate,up,down}_proj``).

The families differ only in the router's rules, written as a ``RouterSpec``:

- LLaDA-MoE: softmax over fp32 logits; the expert bias, when configured, is added to the
  scores, and the biased scores both select and weight (``bias_in_weights=True``); top-k
  never renormalised; no groups.
- LLaDA 2.x: sigmoid over fp32 logits; the bias selects only (``bias_in_weights=False``);
  group-limited top-k (a group's score is the sum of its top two biased scores; the best
  ``topk_group`` of ``n_group`` groups stay, the other experts get -inf); weights are the
  unbiased scores of the chosen experts, renormalised (``renormalize``, top_k > 1) and times
  ``scaling`` (``routed_scaling_factor``). Shared experts are plain ``GatedMLP``s beside
  the routed ones, named where the family's checkpoint puts them.

Where each family keeps its gate weight and ``expert_bias`` differs (LLaDA-MoE:
``mlp.gate.weight`` an ``nn.Linear``, ``mlp.expert_bias``; LLaDA 2.x: ``mlp.gate.weight``
and ``mlp.gate.expert_bias``), so the family module owns them, computes the gate logits as
its reference does, and calls ``route`` then ``experts(x, weights, ids)``.

Compute. ``Experts.forward`` picks a path by device: on CPU the tokens are gathered per
expert (a loop over the experts that received tokens); elsewhere one grouped matmul per
projection over the tokens sorted by expert: ``torch._grouped_mm`` where this torch has it
for the device and dtype, else a padded ``bmm`` (each expert's tokens padded to the
busiest expert's count). The grouped paths need the experts' weights stacked
([E, I, d]); ``stack()`` makes each expert's parameters views of one stacked tensor (no
second copy; ``state_dict`` keeps the HF names), once, after loading. ``path=`` forces one
(tests compare all three on CPU).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model.layers.linear import TPGroup, all_reduce
from illada_batch.model.layers.mlp import GatedMLP


def moe_all_reduce(out: Tensor, tp: TPGroup | None) -> Tensor:
    """An MoE block's output: the sum over ranks of their partial expert (and shared expert)
    outputs, one all-reduce; as is without ``tp``."""
    return out if tp is None else all_reduce(out)


class Score(str, enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    score: Score = Score.SOFTMAX
    bias_in_weights: bool = True  # the biased scores weight the experts too (LLaDA-MoE), or only select (LLaDA 2.x)
    renormalize: bool = False  # chosen weights divided by their sum (only when top_k > 1, as LLaDA 2.x)
    scaling: float = 1.0  # routed_scaling_factor
    n_group: int = 1
    topk_group: int = 1


def route(logits: Tensor, spec: RouterSpec, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gate logits [N, E] -> (weights [N, k] float32, expert ids [N, k])."""
    logits = logits.float()
    scores = logits.softmax(-1) if spec.score is Score.SOFTMAX else logits.sigmoid()  # [N, E]
    biased = scores if bias is None else scores + bias.float()  # [N, E]
    select = biased
    if spec.n_group > 1:
        N, E = biased.shape
        groups = biased.view(N, spec.n_group, E // spec.n_group)  # [N, G, E/G]
        group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
        keep = group_score.topk(spec.topk_group, dim=-1).indices  # [N, topk_group]
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # [N, G]
        select = groups.masked_fill(~kept[..., None], -torch.inf).view(N, E)  # [N, E]
    ids = select.topk(spec.top_k, dim=-1).indices  # [N, k]
    weights = (biased if spec.bias_in_weights else scores).gather(1, ids)  # [N, k]
    if spec.renormalize and spec.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.scaling, ids


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.ones(4, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        fn(a, b, offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GROUPED_MM:
        _GROUPED_MM[key] = _grouped_mm_works(device, dtype)
    return _GROUPED_MM[key]


class Experts(nn.ModuleList):
    """The routed experts: ``experts(x [N, d], weights [N, k], ids [N, k]) -> [N, d]``
    (sum over each token's k experts of weight x expert(x), in x's dtype).

    With ``tp`` (``what`` the config field of ``hidden``): every rank holds its ``hidden/N``
    columns of every expert (column-parallel gate/up, row-parallel down) and returns its
    partial sum, not reduced: the MoE block all-reduces it once, with its shared expert's
    (``moe_all_reduce``). Why this split and not whole experts per rank: ``bench/moe_split.py``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, tp: TPGroup | None = None,
                 what: str = "moe_intermediate_size") -> None:
        super().__init__(GatedMLP(dim, hidden, tp, what, reduce=False) for _ in range(num_experts))
        self.stacked: tuple[Tensor, Tensor, Tensor] | None = None  # gate [E, I, d], up [E, I, d], down [E, d, I]

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor, path: str | None = None) -> Tensor:
        path = path or ("loop" if x.device.type == "cpu" else
                        "grouped_mm" if grouped_mm_available(x.device, x.dtype) else "bmm")
        if path == "loop":
            return self._loop(x, weights, ids)
        return self._grouped(x, weights, ids, use_grouped_mm=path == "grouped_mm")

    def _loop(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)  # [N, d]
        for e in ids.unique().tolist():
            token, slot = (ids == e).nonzero(as_tuple=True)  # [n_e], [n_e]
            y = self[e](x[token])  # [n_e, d]
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)

    def stack(self) -> tuple[Tensor, Tensor, Tensor]:
        """Stack the experts' weights once; each expert's parameters become views of them."""
        if self.stacked is None or self.stacked[0].device != self[0].gate_proj.weight.device:
            stacked = tuple(torch.stack([getattr(m, name).weight.detach() for m in self])
                            for name in ("gate_proj", "up_proj", "down_proj"))
            for e, m in enumerate(self):
                for name, w in zip(("gate_proj", "up_proj", "down_proj"), stacked):
                    getattr(m, name).weight = nn.Parameter(w[e], requires_grad=False)
            self.stacked = stacked
        return self.stacked

    def _grouped(self, x: Tensor, weights: Tensor, ids: Tensor, use_grouped_mm: bool) -> Tensor:
        gate, up, down = self.stack()
        N, k = ids.shape
        E = len(self)
        flat = ids.reshape(-1)  # [N*k]
        order = flat.argsort(stable=True)  # [N*k] by expert
        token = order // k  # [N*k] source token of each sorted slot
        xs = x[token]  # [N*k, d]
        counts = torch.bincount(flat, minlength=E)  # [E]
        if use_grouped_mm:
            offs = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
            h = F.silu(torch._grouped_mm(xs, gate.transpose(1, 2), offs=offs)) * \
                torch._grouped_mm(xs, up.transpose(1, 2), offs=offs)  # [N*k, I]
            ys = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # [N*k, d]
        else:
            C = int(counts.max())
            start = counts.cumsum(0) - counts  # [E]
            rank = torch.arange(len(flat), device=x.device) - start[flat[order]]  # [N*k] place within its expert
            padded = x.new_zeros(E, C, x.shape[-1])  # [E, C, d]
            padded[flat[order], rank] = xs
            h = F.silu(torch.bmm(padded, gate.transpose(1, 2))) * torch.bmm(padded, up.transpose(1, 2))  # [E, C, I]
            ys = torch.bmm(h, down.transpose(1, 2))[flat[order], rank]  # [N*k, d]
        w = weights.reshape(-1)[order]  # [N*k]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [N, d]
        out.index_add_(0, token, ys.float() * w[:, None])
        return out.to(x.dtype)
