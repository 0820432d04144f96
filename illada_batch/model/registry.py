"""The family registry: config.json -> family -> config, card, model class.

Torch-free (the model class is named as ``"module:Class"`` and imported only when a model is
built, as vLLM's registry does), so ``validate`` and the driver side can read a card.
``checkpoint.load_model(path)`` is the loader built on it: it asks ``family_of`` for the
family, builds its model on the meta device and streams the weights in.

How a family plugs in (one file pair and one line here):

1. ``model/configs/<family>.py`` (torch-free): a frozen config dataclass read from the
   family's own config.json field names, refusing contradictions by field name
   (``ConfigError``: "config.json: field 'num_experts_per_tok'=9 > num_experts=8"); a
   ``card(config) -> FamilyCard`` (ids from the config, attention kind, logit shift, KV
   geometry, parameters and active parameters, sampler defaults and the sampler settings
   only it honours); a ``matches(raw) -> bool`` over the parsed config.json; and
   ``FAMILY = Family(name, matches, Config.from_dict, card, "illada_batch.model.<f>:<Class>")``.
2. ``model/<family>.py`` (torch): the architecture only, a ``DiffusionLM`` subclass
   (``model/base.py``) built from ``model/layers/`` (attention with its K/V hook and shared
   prefix, rope with partial rotary, RMSNorm, SwiGLU MLP, MoE router + experts), whose
   module names are the checkpoint's tensor names, so ``state_dict()`` is the HF layout.
   ``__init__(config)`` sets ``self.config`` and ``self.card``.
3. Add ``<family>.FAMILY`` to ``FAMILIES`` below, more specific matchers first (LLaDA-MoE
   says ``model_type: llada`` too, so it sits before LLaDA 1.x).
4. ``train/tiny_families.py`` gains a writer of a tiny random checkpoint in the family's
   real layout, and ``tests/conftest.py``'s ``family_checkpoint(name)`` makes it.

Nothing outside this module and the family files branches on a family's name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

from illada_batch.errors import ConfigError
from illada_batch.model.configs import dream, llada, llada2, llada_moe
from illada_batch.model.family import Family, FamilyCard, tp_problem  # noqa: F401 - for the torch-free side

FAMILIES: tuple[Family, ...] = (
    llada2.FAMILY,
    llada_moe.FAMILY,
    llada.FAMILY,
    dream.FAMILY,
)


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json (``path`` the file), refused in one line when absent or bad."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a model checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return raw


def family_of(raw: Mapping[str, Any], source: str = "config.json") -> Family:
    """The family that claims this config, or a one-line refusal naming what it says."""
    for family in FAMILIES:
        if family.matches(raw):
            return family
    said = f"model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')!r}"
    known = "; ".join(f"{f.name} ({f.describe})" for f in FAMILIES)
    raise ConfigError(f"{source}: no model family for {said}; the families are: {known}")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"no model family {name!r}; the families are: {', '.join(f.name for f in FAMILIES)}")


def parse(path: str | Path) -> tuple[Family, Any]:
    """(family, its config) from a config.json file."""
    raw = read_config(path)
    family = family_of(raw, str(path))
    return family, family.config(raw, str(path))


def setting_owners() -> dict[str, str]:
    """Each sampling setting that only some family honours -> that family's name."""
    return {s: f.name for f in FAMILIES for s in f.settings}


def card_of(directory: str | Path) -> FamilyCard:
    """The card of a checkpoint directory, without torch."""
    family, cfg = parse(Path(directory) / "config.json")
    return family.card(cfg)


def model_class(family: Family) -> type:
    """The family's torch model class (imports torch)."""
    module, _, cls = family.model.partition(":")
    return getattr(importlib.import_module(module), cls)
