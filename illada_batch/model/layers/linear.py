"""Tensor-parallel layers, Megatron style: a layer's weight split across the N ranks of a
replica, each rank holding only its slice (``TPGroup``: this rank's place in the group).

- ``ColumnParallel``: rank r holds output rows [r*out/N, (r+1)*out/N) of the weight (QKV,
  gate/up): its output is this rank's heads or MLP columns; no communication.
- ``RowParallel``: rank r holds input columns [r*in/N, (r+1)*in/N) (attention output, down
  projection): partial sums, one all-reduce.
- ``VocabParallelEmbedding``: rank r holds ceil(V/N) vocabulary rows (the last rank fewer);
  ids outside its rows look up zeros; one all-reduce. The output head uses the same row
  split (``vocab_parallel_logits``): each rank computes the logits of its rows at the
  positions asked for (the sampler's), and an all-gather puts the vocabulary back together.

Each parallel module says which slice of the checkpoint's full tensor it holds
(``tp_dim``, ``tp_range``, ``full_shape``): the loader reads only that slice from the
safetensors file (``get_slice``), so no rank ever holds the full weights. With ``tp`` None a
model builds plain ``nn.Linear`` / ``nn.Embedding`` and runs without torch.distributed.

The all-reduce and all-gather run on torch.distributed's default process group (one TP
group per process: gloo on CPU, NCCL on GPU). Every rank ends a layer with the same bytes:
the all-reduce and all-gather hand every rank one result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model.layers.comm import COMM, nbytes


@dataclass(frozen=True)
class TPGroup:
    """This process's rank in a tensor-parallel group of ``size`` ranks."""

    rank: int
    size: int

    def part(self, n: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of ``n`` (``what`` names it when it does not divide)."""
        if n % self.size:
            raise ValueError(f"{what}={n} does not divide by tensor_parallel_size={self.size}")
        share = n // self.size
        return self.rank * share, (self.rank + 1) * share

    def kv_part(self, n: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's KV heads of ``n``: its equal share when N divides n;
        when n divides N (fewer KV heads than ranks: LLaDA2.0-flash's 4 at TP 8), the one KV
        head its query heads read, replicated on N/n ranks (as SGLang and vLLM do)."""
        if n % self.size == 0 or self.size % n:
            return self.part(n, what)
        head = self.rank // (self.size // n)
        return head, head + 1

    def vocab_part(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's ceil(n/N) vocabulary rows (the last rank may hold fewer)."""
        share = -(-n // self.size)
        return min(n, self.rank * share), min(n, (self.rank + 1) * share)


def all_reduce(x: Tensor) -> Tensor:
    if COMM.on:  # opt-in timing (layers/comm.py)
        COMM.timed("all_reduce", nbytes(x), lambda: dist.all_reduce(x), x.is_cuda)
    else:
        dist.all_reduce(x)
    return x


def all_gather(parts: list[Tensor], x: Tensor) -> None:
    if COMM.on:
        COMM.timed("all_gather", nbytes(x) * len(parts), lambda: dist.all_gather(parts, x), x.is_cuda)
    else:
        dist.all_gather(parts, x)


class _Sliced(nn.Module):
    """A weight that is the slice [tp_range) along ``tp_dim`` of a ``full_shape`` tensor."""

    tp_dim: int
    tp_range: tuple[int, int]
    full_shape: tuple[int, int]

    def _make(self, full: tuple[int, int], dim: int, start: int, stop: int) -> None:
        self.full_shape, self.tp_dim, self.tp_range = full, dim, (start, stop)
        shape = list(full)
        shape[dim] = stop - start
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)


class ColumnParallel(_Sliced):
    """y [..., out/N] = x [..., in] @ W_r^T (+ b_r), W_r this rank's output rows (``rows``: an
    explicit [start, stop), e.g. a replicated KV head's), b_r the same rows of the bias."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, what: str, bias: bool = False,
                 rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self._make((out_features, in_features), 0, *(rows or tp.part(out_features, what)))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0]), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallel(_Sliced):
    """y [..., out] = sum over ranks of x_r [..., in/N] @ W_r^T (+ b, whole on every rank, added
    once after the sum): one all-reduce, or none with ``reduce=False`` (the caller sums several
    partial outputs with one all-reduce: an MoE block's experts and shared expert)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, what: str, bias: bool = False,
                 reduce: bool = True) -> None:
        super().__init__()
        self._make((out_features, in_features), 1, *tp.part(in_features, what))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.reduce = reduce

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        y = all_reduce(y) if self.reduce else y
        return y if self.bias is None else y + self.bias


class FusedColumnParallel(_Sliced):
    """A column-parallel layer over a fused weight, e.g. [Q heads | K heads | V heads] rows:
    this rank holds its slice of each part (``tp_pieces``, in order), read as slices and
    concatenated: y = [q_r | k_r | v_r]."""

    def __init__(self, in_features: int, pieces: list[tuple[int, int]], full_out: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_pieces = pieces
        self._make((full_out, in_features), 0, 0, sum(b - a for a, b in pieces))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0]), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(_Sliced):
    def __init__(self, num: int, dim: int, tp: TPGroup) -> None:
        super().__init__()
        self._make((num, dim), 0, *tp.vocab_part(num))

    def forward(self, ids: Tensor) -> Tensor:
        start, stop = self.tp_range
        local = ids - start
        inside = (local >= 0) & (local < stop - start)  # [B, L]
        out = F.embedding(local.clamp(0, max(stop - start - 1, 0)), self.weight)  # [B, L, d]
        return all_reduce(out * inside[..., None].to(out.dtype))


def vocab_parallel_logits(hidden: Tensor, weight: Tensor, vocab: int, tp: TPGroup) -> Tensor:
    """hidden [..., d] (the same on every rank), weight this rank's vocabulary rows
    [V_r, d] -> logits [..., vocab] on every rank (one all-gather of the asked positions only)."""
    local = F.linear(hidden, weight)  # [..., V_r]
    share = -(-vocab // tp.size)
    if local.shape[-1] < share:  # the last rank's short slice, padded for the gather
        local = F.pad(local, (0, share - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :vocab]  # [..., vocab]


def column(in_features: int, out_features: int, tp: TPGroup | None, what: str, bias: bool = False) -> nn.Module:
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return ColumnParallel(in_features, out_features, tp, what, bias=bias)


def kv_column(in_features: int, n_kv_heads: int, head_dim: int, tp: TPGroup | None, what: str,
              bias: bool = False) -> nn.Module:
    """k or v projection: this rank's KV heads (``TPGroup.kv_part``: replicated when fewer than ranks)."""
    if tp is None:
        return nn.Linear(in_features, n_kv_heads * head_dim, bias=bias)
    start, stop = tp.kv_part(n_kv_heads, what)
    return ColumnParallel(in_features, n_kv_heads * head_dim, tp, what, bias=bias,
                          rows=(start * head_dim, stop * head_dim))


def row(in_features: int, out_features: int, tp: TPGroup | None, what: str, bias: bool = False,
        reduce: bool = True) -> nn.Module:
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallel(in_features, out_features, tp, what, bias=bias, reduce=reduce)


def local_heads(n_heads: int, n_kv_heads: int, tp: TPGroup | None, what: tuple[str, str]) -> tuple[int, int]:
    """(query heads, KV heads) a rank holds; refuses (``ValueError`` naming ``what``, the two
    config fields) heads that do not split whole (a projection's rows may divide when its heads do not)."""
    if tp is None:
        return n_heads, n_kv_heads
    q0, q1 = tp.part(n_heads, what[0])
    k0, k1 = tp.kv_part(n_kv_heads, what[1])
    return q1 - q0, k1 - k0


def embedding(num: int, dim: int, tp: TPGroup | None) -> nn.Module:
    return nn.Embedding(num, dim) if tp is None else VocabParallelEmbedding(num, dim, tp)


def head(dim: int, num: int, tp: TPGroup | None) -> nn.Module:
    """The output head's weight [num, d]: split by vocabulary rows like the embedding."""
    if tp is None:
        return nn.Linear(dim, num, bias=False)
    module = _Sliced()
    module._make((num, dim), 0, *tp.vocab_part(num))
    return module


def local_card(card, tp: TPGroup | None):
    """The card a rank's KV cache is sized by: its own KV heads (every rank's pool has the same
    shape, so page tables are shared)."""
    if tp is None:
        return card
    return dataclasses.replace(card, n_kv_heads=max(1, card.n_kv_heads // tp.size))
