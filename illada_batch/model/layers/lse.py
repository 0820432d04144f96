"""Attention that also returns its log-sum-exp, and the merge of partial attentions by it:
softmax over a union of key sets equals the parts' softmaxes weighted by
exp(lse_part - lse_total) (how cascade attention and paged attention combine a shared
prefix, runs of pages and a row's own keys)."""

from __future__ import annotations

from functools import reduce

import torch
from torch import Tensor

from illada_batch.model.layers import traffic

_TINY = torch.finfo(torch.float32).tiny
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_lse_here(q: Tensor) -> bool:
    """Whether the fused CPU kernel (it returns the log-sum-exp) serves ``q``'s device."""
    return q.device.type == "cpu" and _CPU_FLASH is not None


def attention_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """q [B, H, L, hd], k/v [B, Hkv, T, hd] (H a multiple of Hkv), mask additive [B, 1, L, T]
    in q's dtype or None (off CPU its rows 16-element aligned: the efficient kernel refuses
    others) -> (out [B, H, L, hd] in q's dtype, log-sum-exp of the scaled scores
    [B, H, L] float32). On CPU the fused flash kernel (grouped heads broadcast in it);
    elsewhere torch's efficient attention (grouped heads repeated: a counted copy)."""
    if fused_lse_here(q):
        out, lse = _CPU_FLASH(q, k, v, attn_mask=mask)[:2]
        return out, lse.float()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        traffic.copied("repeat", k.shape[0] * k.shape[2] * rep)
    bias = None if mask is None else mask.expand(-1, q.shape[1], -1, -1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    return out, lse[..., :q.shape[2]].float()


def merge_lse(parts: list[tuple[Tensor, Tensor]], keep_lse: bool = False):
    """Softmax over the union of key sets from each part's (out [..., L, hd], lse [..., L]):
    the parts weighted by exp(lse_part - lse_total), in float32 -> out (and its lse)."""
    top = reduce(torch.maximum, [lse for _, lse in parts])  # [..., L]
    top = top.masked_fill(top == -torch.inf, 0)  # a query no part gives a key: out 0, lse -inf (no NaN)
    w = [(lse - top).exp()[..., None] for _, lse in parts]  # [..., L, 1]
    total = reduce(torch.add, w)  # (reduce, not sum(): no 0 + first, the same numbers in fewer ops)
    out = reduce(torch.add, [o.float() * wi for (o, _), wi in zip(parts, w)]) / total.clamp_min(_TINY)
    return (out, top + total[..., 0].log()) if keep_lse else out
