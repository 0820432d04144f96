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
from illada_batch.model.layers.linear import TPGroup, column, embedding, head, kv_column, local_card, local_heads, row
from illada_batch.model.layers.mlp import swiglu
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.rope import apply_rope

__all__ = ["LLaDA", "Block", "ForwardOut", "KVHook", "LayerKV", "isolated_prefix_mask"]


class Block(nn.Module):
    """With ``tp``: this rank's heads and KV heads (column-parallel q/k/v, row-parallel
    attn_out; KV heads fewer than the ranks replicated, ``TPGroup.kv_part``) and MLP columns (column-parallel ff_proj/up_proj, row-parallel ff_out)."""

    def __init__(self, cfg: LLaDAConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = local_heads(cfg.n_heads, cfg.n_kv_heads, tp, ("n_heads", "n_kv_heads"))  # this rank's
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = column(d, cfg.n_heads * hd, tp, "n_heads")
        self.k_proj = kv_column(d, cfg.n_kv_heads, hd, tp, "n_kv_heads")
        self.v_proj = kv_column(d, cfg.n_kv_heads, hd, tp, "n_kv_heads")
        self.attn_out = row(cfg.n_heads * hd, d, tp, "n_heads")
        self.ff_proj = column(d, cfg.mlp_hidden_size, tp, "mlp_hidden_size")
        self.up_proj = column(d, cfg.mlp_hidden_size, tp, "mlp_hidden_size")
        self.ff_out = row(cfg.mlp_hidden_size, d, tp, "mlp_hidden_size")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                prefix: LayerKV | None, kv_hook: LayerKVHook | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, cfg.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(B, L, self.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(B, L, self.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.attn_out(attend(q, k, v, mask, prefix, kv_hook))  # [B, L, d]
        h = self.ff_norm(x)
        return x + swiglu(h, self.ff_proj, self.up_proj, self.ff_out)


class LLaDA(DiffusionLM):
    """``model(input_ids, attention_mask=None) -> logits [B, L, V]``."""

    def __init__(self, cfg: LLaDAConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config, self.card, self.tp = cfg, local_card(card(cfg), tp), tp
        self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=embedding(cfg.embedding_size, cfg.d_model, tp),
            blocks=nn.ModuleList(Block(cfg, tp) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.model.transformer.ff_out = head(cfg.d_model, cfg.embedding_size, tp)

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
