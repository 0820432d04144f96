"""The Dream architecture, and nothing else (the forward lives in ``base.py``, its logit
shift in the card, generation in ``decoding/loop.py``).

Dream-7B is Qwen2.5's transformer without a causal mask: RMSNorm in float32, RoPE
(non-interleaved halves, ``rope_theta`` from the config), q/k/v projections with biases and
an o projection without, grouped-query attention, SwiGLU, an untied head. Module names
reproduce Dream's tensor names (``model.layers.0.self_attn.q_proj.bias``) so
``state_dict()`` is the checkpoint layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from illada_batch.model.base import StackedDecoder
from illada_batch.model.configs.dream import DreamConfig, card
from illada_batch.model.layers.attention import LayerKV, LayerKVHook, attend
from illada_batch.model.layers.linear import TPGroup, column, kv_column, local_card, local_heads, row
from illada_batch.model.layers.mlp import GatedMLP
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.rope import apply_rope


class SelfAttention(nn.Module):
    """With ``tp``: this rank's heads and KV heads, each q/k/v bias sliced with its heads."""

    def __init__(self, cfg: DreamConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        d, hd, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = local_heads(H, Hkv, tp, ("num_attention_heads", "num_key_value_heads"))
        self.q_proj = column(d, H * hd, tp, "num_attention_heads", bias=True)
        self.k_proj = kv_column(d, Hkv, hd, tp, "num_key_value_heads", bias=True)
        self.v_proj = kv_column(d, Hkv, hd, tp, "num_key_value_heads", bias=True)
        self.o_proj = row(H * hd, d, tp, "num_attention_heads")

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.n_heads, cfg.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(B, L, self.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(B, L, self.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, prefix, kv_hook))  # [B, L, d]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DreamConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp, "intermediate_size")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: LayerKV | None,
                kv_hook: LayerKVHook | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix, kv_hook)
        return x + self.mlp(self.post_attention_layernorm(x))


class Dream(StackedDecoder):
    """``model(input_ids, attention_mask=None) -> logits [B, L, V]``, already shifted (the card's
    ``logit_shift``: position i from hidden state i-1)."""

    def __init__(self, cfg: DreamConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config, self.card, self.tp = cfg, local_card(card(cfg), tp), tp
        self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self._stack(cfg, [DecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers)], tp)
