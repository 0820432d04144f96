"""LLaDA 2.x configuration (LLaDA2.0-mini/flash, LLaDA2.1: ``model_type: llada2_moe``), read
from its config.json field names, and its card.

Semantics follow the reference modeling file (``modeling_llada2_moe.py``): fused
``query_key_value`` (all Q heads, then K, then V); per-head RMSNorm of Q and K before RoPE
(``use_qk_norm``); partial rotary (``partial_rotary_factor``); GQA; the first
``first_k_dense_replace`` layers dense (``intermediate_size``), the rest a mixture of
experts (sigmoid router in fp32, ``expert_bias`` for selection only, group-limited top-k,
renormalised weights times ``routed_scaling_factor``) with ``num_shared_experts`` shared
experts of ``moe_intermediate_size`` each. Attention at generation is block-causal: blocks
of the sampler's ``block_length`` aligned at position 0 (the card says so; the engine builds
the mask from it). The mask and EOS ids are the config's ``mask_token_id`` / ``eos_token_id``;
the published config has no mask id, so the published tokenizer's (156895, EOS 156892) are
the defaults, never hard-coded in the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from illada_batch.model.configs.hf import from_hf
from illada_batch.model.family import AttentionKind, Family, FamilyCard


@dataclass(frozen=True)
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    n_group: int = 1
    topk_group: int = 1
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 1.0
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mask_token_id: int = 156895
    eos_token_id: int = 156892
    pad_token_id: int = 156892

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_head * self.partial_rotary_factor)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.num_attention_heads % self.num_key_value_heads:
            out.append(("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                               f"num_key_value_heads={self.num_key_value_heads}"))
        if not 0 < self.partial_rotary_factor <= 1:
            out.append(("partial_rotary_factor", f"{self.partial_rotary_factor} is outside (0, 1]"))
        elif self.rotary_dim % 2:
            out.append(("partial_rotary_factor", f"rotary dim {self.rotary_dim} must be even"))
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            out.append(("num_experts_per_tok", f"{self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"))
        if self.n_group < 1 or self.num_experts % self.n_group:
            out.append(("n_group", f"{self.n_group} does not divide num_experts={self.num_experts}"))
        elif not 0 < self.topk_group <= self.n_group:
            out.append(("topk_group", f"{self.topk_group} must be in 1..n_group={self.n_group}"))
        elif self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            out.append(("num_experts_per_tok", f"{self.num_experts_per_tok} > the {self.topk_group} kept group(s) of "
                                               f"{self.num_experts // self.n_group} experts"))
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                out.append((name, f"{getattr(self, name)} is outside the vocabulary (vocab_size={self.vocab_size})"))
        return out

    # Fields whose other values this model does not implement: refused by name.
    _REQUIRED = {"hidden_act": "silu", "rope_scaling": None, "norm_head": False, "use_sliding_window": False}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "LLaDA2Config":
        return from_hf(cls, raw, source, cls._REQUIRED)


def parameters(cfg: LLaDA2Config, experts_used: int | None = None) -> int:
    """Every weight (``experts_used`` None), or those one token reads (top-k experts)."""
    d, hd, H, Hkv = cfg.hidden_size, cfg.dim_head, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = d * (H + 2 * Hkv) * hd + H * hd * d + (2 * hd if cfg.use_qk_norm else 0)
    attn += ((H + 2 * Hkv) * hd if cfg.use_qkv_bias else 0) + (d if cfg.use_bias else 0)
    experts = cfg.num_experts if experts_used is None else experts_used
    moe = d * cfg.num_experts + cfg.num_experts + (experts + cfg.num_shared_experts) * 3 * d * cfg.moe_intermediate_size
    dense = 3 * d * cfg.intermediate_size
    layers = sum(2 * d + attn + (moe if cfg.is_moe(i) else dense) for i in range(cfg.num_hidden_layers))
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + layers + d + head


# Settings only LLaDA 2.x honours (the spec refuses them for other families).
SAMPLER_SETTINGS = frozenset({"editing_threshold", "max_post_steps"})


def card(cfg: LLaDA2Config) -> FamilyCard:
    return FamilyCard(family="llada2", mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id,
                      pad_token_id=cfg.pad_token_id, vocab_size=cfg.vocab_size,
                      max_sequence_length=cfg.max_position_embeddings,
                      attention=AttentionKind.BLOCK_CAUSAL, attention_block=None,  # the sampler's block_length
                      n_layers=cfg.num_hidden_layers, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_head,
                      parameters=parameters(cfg), active_parameters=parameters(cfg, cfg.num_experts_per_tok),
                      sampler_defaults=(("transfer_rule", "block_schedule"),),
                      sampler_settings=SAMPLER_SETTINGS)


def matches(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == "llada2_moe" or "LLaDA2MoeModelLM" in (raw.get("architectures") or ())


# The real shape (inclusionAI/LLaDA2.0-mini config.json, 16B with 1.4B active): 20 layers, the
# first dense, 256 experts top-8 of 512 in 8 groups of which 4 are kept, one shared expert,
# GQA 16 over 4 heads of 128, half the head rotary.
PRESETS = {
    "llada2-mini": LLaDA2Config(vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                                num_key_value_heads=4, head_dim=128, intermediate_size=5120, moe_intermediate_size=512,
                                num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
                                first_k_dense_replace=1, routed_scaling_factor=2.5, partial_rotary_factor=0.5,
                                rope_theta=600_000.0, max_position_embeddings=8192),
    # inclusionAI/LLaDA2.0-flash (Ling-flash-2.0's shape, 100B with 6.1B active): 32 layers, the
    # first dense, 256 experts top-8 of 1024 in 8 groups of which 4 are kept, one shared expert,
    # GQA 32 over 4 heads of 128 (at TP 8 each KV head is on 2 ranks), half the head rotary.
    "llada2-flash": LLaDA2Config(vocab_size=157184, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, intermediate_size=9216,
                                 moe_intermediate_size=1024, num_experts=256, num_experts_per_tok=8, n_group=8,
                                 topk_group=4, num_shared_experts=1, first_k_dense_replace=1,
                                 routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=600_000.0,
                                 max_position_embeddings=32768),
}

def tp_splits(cfg: LLaDA2Config) -> dict[str, int]:
    """What a TP size must divide: heads, KV heads (or be divided by them: replicated), the
    dense and expert widths (each routed and shared expert split by its intermediate size)."""
    out = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
           "moe_intermediate_size": cfg.moe_intermediate_size}
    if cfg.first_k_dense_replace:
        out["intermediate_size"] = cfg.intermediate_size
    return out


FAMILY = Family(name="llada2", matches=matches, config=LLaDA2Config.from_dict, card=card,
                model="illada_batch.model.llada2:LLaDA2",
                describe="model_type 'llada2_moe' / architectures ['LLaDA2MoeModelLM']",
                settings=SAMPLER_SETTINGS, presets=PRESETS, tp_splits=tp_splits,
                tp_replicable=frozenset({"num_key_value_heads"}))
