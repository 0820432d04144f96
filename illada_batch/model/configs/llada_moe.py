"""LLaDA-MoE configuration (LLaDA-MoE-7B-A1B), read from its config.json field names.

The published config says ``model_type: llada`` (as LLaDA 1.x) with ``architectures:
["LLaDAMoEModelLM"]`` and ``num_experts``; the reference's own config class says
``lladamoe``. Either is recognised. Semantics follow the reference modeling file: softmax
router in fp32, ``expert_bias`` (``moe_router_enable_expert_bias``) added to the scores
that both select and weight, top-k never renormalised (the reference ignores
``norm_topk_prob``, ``routed_scaling_factor`` and the router groups, and so does this
model), ``moe_layer_freq[i] == 0`` for a dense layer, a shared expert beside every MoE
layer when ``shared_expert_intermediate_size`` is set. The config holds no mask id: it is
``mask_token_id`` when present, else the published tokenizer's ``<|mask|>`` (156895).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from illada_batch.model.configs.hf import from_hf
from illada_batch.model.family import Family, FamilyCard


@dataclass(frozen=True)
class LLaDAMoEConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    dense_intermediate_size: int
    expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_layer_freq: tuple[int, ...]
    shared_expert_intermediate_size: int | None = None
    moe_router_enable_expert_bias: bool = False
    qk_layernorm: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    partial_rotary_factor: float = 1.0
    rope_theta: float = 50_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mask_token_id: int = 156895
    eos_token_id: int = 156892
    pad_token_id: int = 156892

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] != 0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.hidden_size % self.num_attention_heads:
            out.append(("num_attention_heads", f"hidden_size={self.hidden_size} is not a multiple of "
                                               f"num_attention_heads={self.num_attention_heads}"))
        if self.num_attention_heads % self.num_key_value_heads:
            out.append(("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                               f"num_key_value_heads={self.num_key_value_heads}"))
        if not 0 < self.partial_rotary_factor <= 1:
            out.append(("partial_rotary_factor", f"{self.partial_rotary_factor} is outside (0, 1]"))
        elif self.rotary_dim % 2:
            out.append(("partial_rotary_factor", f"rotary dim {self.rotary_dim} must be even"))
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            out.append(("num_experts_per_tok", f"{self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"))
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            out.append(("moe_layer_freq", f"{len(self.moe_layer_freq)} entries for num_hidden_layers="
                                          f"{self.num_hidden_layers}"))
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                out.append((name, f"{getattr(self, name)} is outside the vocabulary (vocab_size={self.vocab_size})"))
        return out

    # Fields whose other values this model does not implement: refused by name.
    _REQUIRED = {"hidden_act": "silu", "rope_scaling": None, "moe_router_score_function": "softmax"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "LLaDAMoEConfig":
        return from_hf(cls, raw, source, cls._REQUIRED, _freq_as_tuple)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_act": "silu",
                               "moe_router_score_function": "softmax", "rope_scaling": None, "norm_topk_prob": False}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        out["moe_layer_freq"] = list(self.moe_layer_freq)
        return out


def parameters(cfg: LLaDAMoEConfig, experts_used: int | None = None) -> int:
    """Every weight (``experts_used`` None), or those one token reads (top-k experts)."""
    d, hd, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = d * (H + 2 * Hkv) * hd + H * hd * d
    attn += 2 * hd if cfg.qk_layernorm else 0
    attn += (H + 2 * Hkv) * hd + d if cfg.attention_bias else 0
    experts = cfg.num_experts if experts_used is None else experts_used
    moe = d * cfg.num_experts + experts * 3 * d * cfg.expert_intermediate_size
    moe += 3 * d * cfg.shared_expert_intermediate_size if cfg.shared_expert_intermediate_size else 0
    moe += cfg.num_experts if cfg.moe_router_enable_expert_bias else 0
    dense = 3 * d * cfg.dense_intermediate_size
    layers = sum(2 * d + attn + (moe if cfg.is_moe(i) else dense) for i in range(cfg.num_hidden_layers))
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + layers + d + head


def _freq_as_tuple(kwargs: dict) -> None:
    kwargs["moe_layer_freq"] = tuple(int(x) for x in kwargs["moe_layer_freq"])


def card(cfg: LLaDAMoEConfig) -> FamilyCard:
    return FamilyCard(family="llada-moe", mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id,
                      pad_token_id=cfg.pad_token_id, vocab_size=cfg.vocab_size,
                      max_sequence_length=cfg.max_position_embeddings, n_layers=cfg.num_hidden_layers,
                      n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, parameters=parameters(cfg),
                      active_parameters=parameters(cfg, experts_used=cfg.num_experts_per_tok))


def matches(raw: Mapping[str, Any]) -> bool:
    if raw.get("model_type") == "lladamoe":
        return True
    return raw.get("model_type") == "llada" and bool(
        raw.get("num_experts") or "LLaDAMoEModelLM" in (raw.get("architectures") or ()))


# The real shape (inclusionAI/LLaDA-MoE-7B-A1B-Base/Instruct config.json): 16 layers, every
# one MoE, 64 experts top-8 of 1024, no shared expert, q/k norm, 16 KV heads.
PRESETS = {
    "llada-moe": LLaDAMoEConfig(vocab_size=157184, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=16, dense_intermediate_size=8192, expert_intermediate_size=1024,
                                num_experts=64, num_experts_per_tok=8, moe_layer_freq=(1,) * 16, qk_layernorm=True,
                                rope_theta=50_000.0, max_position_embeddings=8192),
}

def tp_splits(cfg: LLaDAMoEConfig) -> dict[str, int]:
    """What a TP size must divide: heads, KV heads (or be divided by them), every MLP width
    (each expert is split by its intermediate size: ``layers/moe.py``)."""
    out = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
           "expert_intermediate_size": cfg.expert_intermediate_size}
    if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        out["dense_intermediate_size"] = cfg.dense_intermediate_size
    if cfg.shared_expert_intermediate_size:
        out["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return out


FAMILY = Family(name="llada-moe", matches=matches, config=LLaDAMoEConfig.from_dict, card=card,
                model="illada_batch.model.llada_moe:LLaDAMoE",
                describe="model_type 'llada' or 'lladamoe' with architectures ['LLaDAMoEModelLM'] / num_experts",
                presets=PRESETS, tp_splits=tp_splits, tp_replicable=frozenset({"num_key_value_heads"}))
