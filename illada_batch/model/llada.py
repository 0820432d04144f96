"""The LLaDA 1.x architecture, and nothing else (the forward lives in ``base.py``,
generation in ``decoding/loop.py``).

LLaDA-8B is a Llama-style transformer without a causal mask: RMSNorm in float32, RoPE
(non-interleaved halves, float32), SwiGLU ``ff_out(silu(ff_proj(x)) * up_proj(x))``, no
biases, an untied output head, grouped-query attention when ``n_kv_heads < n_heads``.
Module names reproduce LLaDA's tensor names (``model.transformer.blocks.0.q_proj.weight``)
so ``state_dict()`` is the checkpoint layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from illada_batch.model.base import DiffusionLM, ForwardOut, KVHook
from illada_batch.model.configs.llada import LLaDAConfig, card
from illada_batch.model.layers.attention import LayerKV, LayerKVHook, attend, isolated_prefix_mask
from illada_batch.model.layers.mlp import swiglu
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.rope import apply_rope

__all__ = ["LLaDA", "Block", "ForwardOut", "KVHook", "LayerKV", "isolated_prefix_mask"]


class Block(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                prefix: LayerKV | None, kv_hook: LayerKVHook | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.attn_out(attend(q, k, v, mask, prefix, kv_hook))  # [B, L, d]
        h = self.ff_norm(x)
        return x + swiglu(h, self.ff_proj, self.up_proj, self.ff_out)


class LLaDA(DiffusionLM):
    """``model(input_ids, attention_mask=None) -> logits [B, L, V]``."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config, self.card = cfg, card(cfg)
        self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.model.transformer.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.transformer.wte(input_ids)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.transformer.ln_f(hidden)

    @property
    def head_weight(self) -> Tensor:
        t = self.model.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight
