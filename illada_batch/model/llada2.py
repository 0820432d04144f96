"""The LLaDA 2.x architecture (``llada2_moe``: LLaDA2.0-mini/flash, LLaDA2.1), and nothing else.

Llama-style with Bailing's names: RMSNorm in float32; a fused ``attention.query_key_value``
(all Q heads, then K, then V; bias when ``use_qkv_bias``), per-head RMSNorm of Q and K
(``query_layernorm``, ``key_layernorm``) before RoPE, partial rotary (the first
``rotary_dim`` channels of each head), GQA, ``attention.dense`` out (bias when ``use_bias``).
The first ``first_k_dense_replace`` layers have a dense SwiGLU MLP; the others a mixture of
experts: ``mlp.gate`` (its ``weight`` and ``expert_bias``) routes with sigmoid scores in fp32,
the bias selecting only, group-limited top-k, renormalised weights times
``routed_scaling_factor`` (``layers/moe.py``), plus ``mlp.shared_experts``. Module names are
the checkpoint's tensor names (``model.word_embeddings.weight``,
``model.layers.1.mlp.experts.3.down_proj.weight``, ``lm_head.weight``).

Attention is whatever mask the caller gives: at generation the engine gives the block-causal
mask the card asks for (``decoding/loop.py``), as the model was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model.base import StackedDecoder
from illada_batch.model.configs.llada2 import LLaDA2Config, card
from illada_batch.model.layers.attention import LayerKV, LayerKVHook, attend
from illada_batch.model.layers.linear import FusedColumnParallel, TPGroup, local_card, local_heads, row
from illada_batch.model.layers.mlp import GatedMLP
from illada_batch.model.layers.moe import Experts, RouterSpec, Score, moe_all_reduce, route
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.rope import apply_rope


def fused_qkv(d: int, H: int, Hkv: int, hd: int, tp: TPGroup | None, bias: bool) -> nn.Module:
    """``query_key_value``: [all Q heads | K heads | V heads] rows; with ``tp`` this rank's
    slice of each of the three (its Q heads, its KV heads), read as three slices."""
    if tp is None:
        return nn.Linear(d, (H + 2 * Hkv) * hd, bias=bias)
    q0, q1 = tp.part(H, "num_attention_heads")
    k0, k1 = tp.kv_part(Hkv, "num_key_value_heads")
    pieces = [(q0 * hd, q1 * hd), ((H + k0) * hd, (H + k1) * hd), ((H + Hkv + k0) * hd, (H + Hkv + k1) * hd)]
    return FusedColumnParallel(d, pieces, (H + 2 * Hkv) * hd, bias=bias)


class Attention(nn.Module):
    """With ``tp``: this rank's heads and KV heads (``fused_qkv``), ``dense`` row-parallel (its
    bias added once, after the all-reduce); q/k norms are per head_dim, on every rank."""

    def __init__(self, cfg: LLaDA2Config, tp: TPGroup | None = None) -> None:
        super().__init__()
        d, hd, H = cfg.hidden_size, cfg.dim_head, cfg.num_attention_heads
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = local_heads(H, cfg.num_key_value_heads, tp, ("num_attention_heads", "num_key_value_heads"))
        self.query_key_value = fused_qkv(d, H, cfg.num_key_value_heads, hd, tp, cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.dense = row(H * hd, d, tp, "num_attention_heads", bias=cfg.use_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.query_key_value(x).view(B, L, H + 2 * Hkv, cfg.dim_head)  # [B, L, H + 2 Hkv, hd]
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)  # [B, L, H or Hkv, hd]
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.dense(attend(q, k, v, mask, prefix, kv_hook))  # [B, L, d]


class Gate(nn.Module):
    """The router's ``weight`` [E, d] and ``expert_bias`` [E] (a buffer in the checkpoint)."""

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, d] -> gate logits [N, E] in float32, as the reference computes them."""
        return F.linear(x.float(), self.weight.float())


class SparseMoE(nn.Module):
    """With ``tp``: the router on every rank, each expert and the shared experts split by
    their intermediate size; one all-reduce of their summed parts."""

    def __init__(self, cfg: LLaDA2Config, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.spec = RouterSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, score=Score.SIGMOID,
                               bias_in_weights=False, renormalize=True, scaling=cfg.routed_scaling_factor,
                               n_group=cfg.n_group, topk_group=cfg.topk_group)
        self.tp = tp
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, tp, "moe_intermediate_size")
        self.shared_experts = (GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts, tp,
                                        "moe_intermediate_size", reduce=False)
                               if cfg.num_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, d]
        weights, ids = route(self.gate(flat), self.spec, self.gate.expert_bias)  # [N, k] float32, [N, k]
        out = self.experts(flat, weights, ids)  # [N, d] (this rank's part under TP)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return moe_all_reduce(out, self.tp).view(x.shape)


class Layer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, index: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.attention = Attention(cfg, tp)
        self.mlp = SparseMoE(cfg, tp) if cfg.is_moe(index) else GatedMLP(d, cfg.intermediate_size, tp,
                                                                         "intermediate_size")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, prefix, kv_hook)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2(StackedDecoder):
    EMBEDDING = "word_embeddings"

    def __init__(self, cfg: LLaDA2Config, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config, self.card, self.tp = cfg, local_card(card(cfg), tp), tp
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self._stack(cfg, [Layer(cfg, i, tp) for i in range(cfg.num_hidden_layers)], tp)
