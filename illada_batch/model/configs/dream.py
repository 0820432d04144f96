"""Dream configuration (Dream-v0-Base/Instruct-7B), read from its config.json field names.

Dream is Qwen2.5 turned into a masked-diffusion model: ``model_type: "Dream"`` (a capital
D), ``architectures: ["DreamModel"]``. Attention is bidirectional; position i's token is
predicted by hidden state i-1 (logit shift 1, the card says so). Mask, EOS and pad ids
come from the config (``mask_token_id`` 151666, ``eos_token_id``/``pad_token_id`` 151643
in Dream-7B). Its sampler (``alg``, ``alg_temp``) is this family's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from illada_batch.model.configs.hf import from_hf
from illada_batch.model.family import Family, FamilyCard


@dataclass(frozen=True)
class DreamConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.hidden_size % self.num_attention_heads:
            out.append(("num_attention_heads", f"hidden_size={self.hidden_size} is not a multiple of "
                                               f"num_attention_heads={self.num_attention_heads}"))
        elif self.head_dim % 2:
            out.append(("num_attention_heads", f"head dim {self.head_dim} must be even for RoPE"))
        if self.num_attention_heads % self.num_key_value_heads:
            out.append(("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                               f"num_key_value_heads={self.num_key_value_heads}"))
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                out.append((name, f"{getattr(self, name)} is outside the vocabulary (vocab_size={self.vocab_size})"))
        return out

    # Fields whose other values this model does not implement: refused by name.
    _REQUIRED = {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "DreamConfig":
        return from_hf(cls, raw, source, cls._REQUIRED)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
                               "rope_scaling": None, "use_sliding_window": False}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        return out


def parameters(cfg: DreamConfig) -> int:
    """Every weight: embeddings, q/k/v (with biases) and o, SwiGLU, two norms a layer, head."""
    d, hd, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = d * (H + 2 * Hkv) * hd + (H + 2 * Hkv) * hd + H * hd * d
    layer = attn + 3 * d * cfg.intermediate_size + 2 * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.num_hidden_layers * layer + d + head


FAMILY_SETTINGS = frozenset({"alg", "alg_temp"})  # the SamplingParams fields only Dream honours


def card(cfg: DreamConfig) -> FamilyCard:
    n = parameters(cfg)
    return FamilyCard(family="dream", mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id,
                      pad_token_id=cfg.pad_token_id, vocab_size=cfg.vocab_size,
                      max_sequence_length=cfg.max_position_embeddings, logit_shift=1,
                      n_layers=cfg.num_hidden_layers, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                      parameters=n, active_parameters=n, sampler_settings=FAMILY_SETTINGS)


def matches(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == "Dream" or "DreamModel" in (raw.get("architectures") or ())


# The real shape (Dream-org/Dream-v0-Instruct-7B config.json, Qwen2.5-7B's): GQA 28 query
# heads over 4 KV heads, SwiGLU 18944, 152064 ids, rope theta 1e6.
PRESETS = {
    "dream-7b": DreamConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0,
                            max_position_embeddings=131072),
}

FAMILY = Family(name="dream", matches=matches, config=DreamConfig.from_dict, card=card,
                model="illada_batch.model.dream:Dream",
                describe="model_type 'Dream' / architectures ['DreamModel']",
                settings=FAMILY_SETTINGS, presets=PRESETS,
                tp_splits=lambda c: {"num_attention_heads": c.num_attention_heads,
                                     "num_key_value_heads": c.num_key_value_heads,
                                     "intermediate_size": c.intermediate_size},
                tp_replicable=frozenset({"num_key_value_heads"}))
