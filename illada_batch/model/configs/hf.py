"""Reading a Hugging Face config.json into a family's frozen config dataclass: the steps the
Qwen2-style families (LLaDA-MoE, LLaDA 2.x, Dream) share, written once."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Callable, Mapping

from illada_batch.errors import ConfigError


def from_hf(cls, raw: Mapping[str, Any], source: str, required: Mapping[str, Any],
            adjust: Callable[[dict], None] | None = None):
    """``cls(**fields of raw)``: fields whose other values the model does not implement
    (``required``: name -> the value it needs) refused by name; unset or null fields take the
    class defaults; KV heads default to the heads, a list of EOS ids to its first, pad to EOS;
    ``adjust(kwargs)`` converts what the family needs; then the config's own ``problems()``
    are refused, each naming its field."""
    for key, wanted in required.items():
        if raw.get(key, wanted) not in (wanted, None):
            raise ConfigError(f"{source}: field {key!r}={raw[key]!r} is not supported (this model needs {wanted!r})")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
    if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if "pad_token_id" not in kwargs and "eos_token_id" in kwargs:
        kwargs["pad_token_id"] = kwargs["eos_token_id"]
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    if adjust is not None:
        adjust(kwargs)
    cfg = cls(**kwargs)
    problems = cfg.problems()
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(f"field {name!r}: {msg}" for name, msg in problems))
    return cfg
