"""A slow, obviously-correct LLaDA-MoE forward, written from the architecture's definition
(the published modeling file's semantics, re-derived here): one row, float64, plain loops
over heads, tokens and experts, weights read by their checkpoint names from a dict.

Per layer: x += o_proj(attention(rope(qk_norm(q)), rope(qk_norm(k)), v)) over
input_layernorm(x); then h = post_attention_layernorm(x) and x += mlp(h) (+ shared_expert(h)
on MoE layers). Attention: every position to every position, GQA head g serves query heads
g * H/Hkv ...; RoPE rotates channel j with channel j + rd/2 (j < rd/2) by angle
position / theta^(2j/rd) on the first rd = head_dim * partial_rotary_factor channels.
Router: p = softmax(gate(h)); s = p + expert_bias; the k experts with the largest s, each
weighted by its s (no renormalisation).
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _swiglu(x, W, name):
    gate, up, down = (W(f"{name}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj"))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _rope(x, rd, theta):
    """x [L, heads, hd] -> rotated, position t = row index."""
    out = x.clone()
    half = rd // 2
    for t in range(x.shape[0]):
        for j in range(half):
            angle = t / theta ** (2 * j / rd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, :, j], x[t, :, j + half]
            out[t, :, j], out[t, :, j + half] = a * c - b * s, b * c + a * s
    return out


def oracle_logits(cfg, weights: dict, ids: list[int]) -> torch.Tensor:
    """Logits [L, vocab] float64 of one unpadded row ``ids``."""
    def W(name):
        return weights[name].double()

    eps, H, Hkv, hd = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rd = int(hd * cfg.partial_rotary_factor)
    L = len(ids)
    x = W("model.embed_tokens.weight")[ids]  # [L, d]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, W(p + "input_layernorm.weight"), eps)
        q = (h @ W(p + "self_attn.q_proj.weight").T).view(L, H, hd)
        k = (h @ W(p + "self_attn.k_proj.weight").T).view(L, Hkv, hd)
        v = (h @ W(p + "self_attn.v_proj.weight").T).view(L, Hkv, hd)
        if cfg.qk_layernorm:
            q, k = _rms(q, W(p + "self_attn.q_norm.weight"), eps), _rms(k, W(p + "self_attn.k_norm.weight"), eps)
        q, k = _rope(q, rd, cfg.rope_theta), _rope(k, rd, cfg.rope_theta)
        heads = []
        for head in range(H):
            g = head // (H // Hkv)
            scores = q[:, head] @ k[:, g].T / math.sqrt(hd)  # [L, L]
            heads.append(torch.softmax(scores, -1) @ v[:, g])  # [L, hd]
        x = x + torch.cat(heads, -1) @ W(p + "self_attn.o_proj.weight").T
        h = _rms(x, W(p + "post_attention_layernorm.weight"), eps)
        if not cfg.is_moe(i):
            x = x + _swiglu(h, W, p + "mlp")
            continue
        out = torch.zeros_like(h)
        for t in range(L):
            s = torch.softmax(W(p + "mlp.gate.weight") @ h[t], -1)
            if cfg.moe_router_enable_expert_bias:
                s = s + W(p + "mlp.expert_bias")
            for e in sorted(range(cfg.num_experts), key=lambda e: -float(s[e]))[:cfg.num_experts_per_tok]:
                out[t] += s[e] * _swiglu(h[t], W, f"{p}mlp.experts.{e}")
        if cfg.shared_expert_intermediate_size:
            out = out + _swiglu(h, W, p + "shared_expert")
        x = x + out
    x = _rms(x, W("model.norm.weight"), eps)
    head = W("model.embed_tokens.weight") if cfg.tie_word_embeddings else W("lm_head.weight")
    return x @ head.T
