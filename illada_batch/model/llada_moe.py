"""The LLaDA-MoE architecture (LLaDA-MoE-7B-A1B), and nothing else.

Bidirectional, Llama-style: RMSNorm in float32; separate q/k/v/o projections (bias when
``attention_bias``; clamped to ``clip_qkv`` when set); optional q/k RMSNorm over head_dim
(one weight shared by the heads) before RoPE, with partial rotary; GQA. Each layer's MLP is
dense (``moe_layer_freq[i] == 0``) or a mixture of experts (softmax router, bias in the
weights, top-k without renormalisation: ``layers/moe.py``) with an optional shared expert
beside it. Module names are the checkpoint's tensor names (``model.layers.0.self_attn.q_proj
.weight``, ``model.layers.1.mlp.experts.3.down_proj.weight``, ``lm_head.weight``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from illada_batch.model.base import StackedDecoder
from illada_batch.model.configs.llada_moe import LLaDAMoEConfig, card
from illada_batch.model.layers.attention import LayerKV, LayerKVHook, attend
from illada_batch.model.layers.linear import TPGroup, column, kv_column, local_card, local_heads, row
from illada_batch.model.layers.mlp import GatedMLP
from illada_batch.model.layers.moe import Experts, RouterSpec, Score, moe_all_reduce, route
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.rope import apply_rope


class Attention(nn.Module):
    """With ``tp``: this rank's heads and KV heads (q/k/v biases sliced with them), o_proj
    row-parallel (its bias added once, after the all-reduce)."""

    def __init__(self, cfg: LLaDAMoEConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = local_heads(H, Hkv, tp, ("num_attention_heads", "num_key_value_heads"))
        self.q_proj = column(d, H * hd, tp, "num_attention_heads", bias=bias)
        self.k_proj = kv_column(d, Hkv, hd, tp, "num_key_value_heads", bias=bias)
        self.v_proj = kv_column(d, Hkv, hd, tp, "num_key_value_heads", bias=bias)
        self.o_proj = row(H * hd, d, tp, "num_attention_heads", bias=bias)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, cfg.head_dim)  # [B, L, H, hd]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, cfg.head_dim)  # [B, L, Hkv, hd]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, cfg.head_dim)  # [B, L, Hkv, hd]
        if cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, prefix, kv_hook))  # [B, L, d]


class SparseMoE(nn.Module):
    """``gate`` (a Linear to expert logits, on every rank), ``experts``, ``expert_bias`` when
    configured, and the shared expert when configured (beside the routed ones: its sum with
    theirs is all-reduced once under TP)."""

    def __init__(self, cfg: LLaDAMoEConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.spec = RouterSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, score=Score.SOFTMAX,
                               bias_in_weights=True, renormalize=False)
        self.tp = tp
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, tp,
                               "expert_intermediate_size")
        if cfg.moe_router_enable_expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        else:
            self.expert_bias = None

    def forward(self, x: Tensor, shared: nn.Module | None = None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, d]
        weights, ids = route(self.gate(flat), self.spec, self.expert_bias)  # [N, k] float32, [N, k]
        out = self.experts(flat, weights, ids)  # [N, d] (this rank's part under TP)
        if shared is not None:
            out = out + shared(flat)
        return moe_all_reduce(out, self.tp).view(x.shape)


class Layer(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig, index: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        moe = cfg.is_moe(index)
        self.mlp = SparseMoE(cfg, tp) if moe else GatedMLP(d, cfg.dense_intermediate_size, tp, "dense_intermediate_size")
        if moe and cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(d, cfg.shared_expert_intermediate_size, tp, "shared_expert_intermediate_size",
                                          reduce=False)
        else:
            self.shared_expert = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix, kv_hook)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h, self.shared_expert) if isinstance(self.mlp, SparseMoE) else self.mlp(h)
        return x + out


class LLaDAMoE(StackedDecoder):
    def __init__(self, cfg: LLaDAMoEConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config, self.card, self.tp = cfg, local_card(card(cfg), tp), tp
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self._stack(cfg, [Layer(cfg, i, tp) for i in range(cfg.num_hidden_layers)], tp)
