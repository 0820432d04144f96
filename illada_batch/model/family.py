"""What a family declares (``Family``) and the facts everything above the model reads
(``FamilyCard``). Torch-free: the driver side and ``validate`` read cards without torch.

Nothing outside ``model/`` looks at a family's name or its config fields: the engine, the
cache plans, the sampler, ``bench``, ``validate`` and the job ask ``model.card`` (or
``registry.card_of(directory)``) for ids, attention kind, logit shift and KV sizes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping


class AttentionKind(str, enum.Enum):
    """How a family attends at generation."""

    BIDIRECTIONAL = "bidirectional"  # every position to every position (LLaDA 1.x, LLaDA-MoE, Dream)
    BLOCK_CAUSAL = "block-causal"  # its own block and the blocks before it (LLaDA 2.x), blocks aligned at 0


@dataclass(frozen=True)
class FamilyCard:
    """The facts of one loaded checkpoint that the engine, sampler, caches and job read."""

    family: str  # the registry's name, e.g. "llada", "llada-moe"
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int  # rows of the output head (ids at or above it are never produced)
    max_sequence_length: int  # the longest [prefix | prompt | response] the engine admits
    attention: AttentionKind = AttentionKind.BIDIRECTIONAL
    attention_block: int | None = None  # block size when attention is BLOCK_CAUSAL
    logit_shift: int = 0  # 1: position i's token is predicted by hidden state i-1 (Dream)
    # K/V geometry, for pages and kv_budget: every layer stores K and V of n_kv_heads x head_dim.
    n_layers: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    parameters: int = 0  # every weight, embeddings and head included
    active_parameters: int = 0  # the weights one token's forward reads (MoE: top-k experts only)
    # Sampler: the SamplingParams defaults this family's reference uses, and the settings
    # only this family honours (the spec refuses them for other families).
    sampler_defaults: tuple[tuple[str, Any], ...] = ()
    sampler_settings: frozenset[str] = frozenset()

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over every layer, at ``dtype_bytes`` per element."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def longest_row(self, gen_length: int | None = None, block_length: int | None = None) -> int:
        """The most tokens one row's K/V pages hold (``kv_budget`` needs room for one such row):
        the model's longest sequence; for a block-causal model, whose blocks are aligned at 0,
        its complete prompt blocks, the response and one more block (the last block's tail, or a
        filler block when the prompt ends on a block boundary: ``decoding/loop._window``), so up
        to a block more. Without ``gen_length`` the bound a block-causal card can give alone."""
        block = self.attention_block or block_length
        if self.attention is not AttentionKind.BLOCK_CAUSAL or not block:
            return self.max_sequence_length
        if gen_length is None:
            return self.max_sequence_length + block
        return ((self.max_sequence_length - gen_length) // block + 1) * block + gen_length

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.sampler_defaults)

    def resolve(self, params):
        """``params`` (SamplingParams) with each setting left unset (None) that this family
        has a default for set to it (LLaDA 2.x: ``transfer_rule: block_schedule``)."""
        unset = {k: v for k, v in self.sampler_defaults if getattr(params, k, 0) is None}
        return dataclasses.replace(params, **unset) if unset else params


@dataclass(frozen=True)
class Family:
    """One registry entry: how a config.json is recognised and what is built from it.

    ``matches(raw)`` sees the parsed config.json; ``config(raw, source)`` returns the
    family's frozen config (refusing contradictions by field name, as ``ConfigError``);
    ``card(config)`` its ``FamilyCard``; ``model`` is ``"module:Class"`` of the torch model
    (imported only when a model is built, as vLLM's registry does), whose ``__init__``
    takes the config.
    """

    name: str
    matches: Callable[[Mapping[str, Any]], bool]
    config: Callable[[Mapping[str, Any], str], Any]
    card: Callable[[Any], FamilyCard]
    model: str
    describe: str = ""  # how it is recognised, for the "unknown family" message
    settings: frozenset[str] = frozenset()  # SamplingParams fields only this family honours
    # Tensor parallelism: config.json field -> its value, for each count a TP size must
    # divide (heads, KV heads, MLP width, experts); None: the family's layers are not split yet.
    tp_splits: Callable[[Any], dict[str, int]] | None = None
    # Of those fields, the ones that may also be fewer than the ranks when they divide them
    # (KV heads: each then on N/value ranks, replicated, ``layers/linear.py`` ``kv_part``).
    tp_replicable: frozenset[str] = frozenset()
    presets: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # real shapes: name -> config


def tp_problem(family: Family, config: Any, size: int) -> str | None:
    """Why ``size`` ranks cannot split this model (one line naming the config.json field), or None."""
    if size == 1:
        return None
    if family.tp_splits is None:
        return f"the {family.name} family does not run tensor-parallel yet (tensor_parallel_size={size})"
    for name, value in family.tp_splits(config).items():
        if name in family.tp_replicable and value < size and size % value == 0:
            continue
        if value % size:
            also = " (nor divides it)" if name in family.tp_replicable else ""
            return f"config.json field {name!r}={value} does not divide by tensor_parallel_size={size}{also}"
    return None
