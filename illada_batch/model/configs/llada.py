"""LLaDA model configuration, read from and written to a checkpoint's ``config.json``.

Field names are LLaDA's own (``d_model``, ``n_layers``, ``mlp_hidden_size`` ...), so a
checkpoint directory of LLaDA-8B-Base/Instruct or LLaDA-1.5 loads as it ships. Fields the
model cannot honour (biases, ALiBi, weight tying with a separate head ...) are refused by
name instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from illada_batch.errors import ConfigError
from illada_batch.model.family import Family, FamilyCard


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    rope_theta: float = 500_000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    weight_tying: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.embedding_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the embedding (size {self.embedding_size})")

    # --- config.json ---------------------------------------------------------------

    # LLaDA config.json fields we read but that must hold a specific value for this model.
    _REQUIRED_VALUES = {
        "alibi": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "rope": True,
        "layer_norm_type": "rms",
        "block_type": "llama",
        "activation_type": "silu",
        "attention_layer_norm": False,
        "input_emb_norm": False,
        "scale_logits": False,
        "multi_query_attention": None,
    }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LLaDAConfig":
        for key, wanted in cls._REQUIRED_VALUES.items():
            if key in raw and raw[key] != wanted and not (wanted is None and raw[key] is False):
                raise ConfigError(f"{source}: field {key!r}={raw[key]!r} is not supported (this model needs {wanted!r})")
        if raw.get("layer_norm_with_affine") is False:
            raise ConfigError(f"{source}: field 'layer_norm_with_affine'=false is not supported")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        if "n_kv_heads" not in kwargs and "n_heads" in kwargs:
            kwargs["n_kv_heads"] = kwargs["n_heads"]
        if "mlp_hidden_size" not in kwargs and "d_model" in kwargs:
            kwargs["mlp_hidden_size"] = int(raw.get("mlp_ratio", 4)) * kwargs["d_model"]
        if "embedding_size" not in kwargs and "vocab_size" in kwargs:
            kwargs["embedding_size"] = kwargs["vocab_size"]
        missing = [n for n in ("d_model", "n_layers", "n_heads", "vocab_size") if n not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict:
        out = {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "alibi": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "mlp_ratio": 4,
        }
        out.update(asdict(self))
        return out


# Presets: the real shape next to tiny ones (gpt-fast habit).
PRESETS: dict[str, LLaDAConfig] = {
    "llada-8b": LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                            vocab_size=126464, embedding_size=126464, rope_theta=500000.0),
    "tiny": LLaDAConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                        vocab_size=2048, embedding_size=2048, rope_theta=10000.0,
                        mask_token_id=2, eos_token_id=1, pad_token_id=1, max_sequence_length=1024),
}


def parameters(cfg: LLaDAConfig) -> int:
    """Every weight: embedding, per layer two norms, q/k/v/o and the SwiGLU MLP, final norm, head."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    per_layer = 2 * d + attn + 3 * d * cfg.mlp_hidden_size
    head = 0 if cfg.weight_tying else cfg.embedding_size * d
    return cfg.embedding_size * d + cfg.n_layers * per_layer + d + head


def card(cfg: LLaDAConfig) -> FamilyCard:
    n = parameters(cfg)
    return FamilyCard(family="llada", mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id,
                      pad_token_id=cfg.pad_token_id, vocab_size=cfg.embedding_size,
                      max_sequence_length=cfg.max_sequence_length, n_layers=cfg.n_layers,
                      n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, parameters=n, active_parameters=n)


def matches(raw) -> bool:
    """LLaDA 1.x: ``model_type`` llada, no experts (LLaDA-MoE shares the model_type)."""
    return (raw.get("model_type") == "llada" and not raw.get("num_experts")
            and "LLaDAMoEModelLM" not in (raw.get("architectures") or ()))


FAMILY = Family(name="llada", matches=matches, config=LLaDAConfig.from_dict, card=card,
                model="illada_batch.model.llada:LLaDA",
                describe="model_type 'llada' without experts (LLaDA-8B, LLaDA-1.5)",
                tp_splits=lambda c: {"n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                                     "mlp_hidden_size": c.mlp_hidden_size},
                tp_replicable=frozenset({"n_kv_heads"}), presets=PRESETS)
