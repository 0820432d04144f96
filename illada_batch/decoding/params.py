"""Sampling parameters of the diffusion sampler: the one definition of each setting.

The Python API, the engine, the job spec (``sampling:`` in ``jobs/*.yaml``) and the CLI
(``--steps`` ...) all derive from ``SamplingParams``: each field's default, its help text
(which says its trade-off) and its bounds live here and nowhere else. Torch-free, so the
driver side can validate a spec without loading torch.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields

from illada_batch.errors import ParamsError


class Remasking(str, enum.Enum):
    """Which predictions of a step are kept: the most confident, or random ones."""

    LOW_CONFIDENCE = "low_confidence"
    RANDOM = "random"


class Alg(str, enum.Enum):
    """Dream's rule for which masked positions a step fills (its reference ``alg``), over a
    schedule of ``steps`` timesteps from 1 to ``eps``: a step from t to s fills the fraction
    1 - s/t of what is still masked (all of it at the last step)."""

    ORIGIN = "origin"  # each masked position independently, with probability 1 - s/t
    MASKGIT_PLUS = "maskgit_plus"  # the most probable predictions
    TOPK_MARGIN = "topk_margin"  # the largest margin between the top two probabilities
    ENTROPY = "entropy"  # the lowest entropy


class TransferRule(str, enum.Enum):
    """How many masked positions a step of a block unmasks (a family's rule; its card's default)."""

    # LLaDA 1.x: the block's masked positions spread evenly over its steps left (ceil); under a
    # threshold every prediction at or above it, and at least one.
    SPREAD = "spread"
    # LLaDA 2.0: step k unmasks n_k, ``block_length`` spread over the block's steps (the first
    # ``block_length % steps`` get one more), capped at what is masked; under a threshold every
    # prediction above it when there are at least n_k of them, else the n_k most confident.
    BLOCK_SCHEDULE = "block_schedule"


class CacheMode(str, enum.Enum):
    """What an engine keeps between steps (see the engine's design note). ``AUTO`` is no
    mode of its own: it resolves once, from the model's family card (``resolve``)."""

    AUTO = "auto"  # the model's best exact-or-default cache: block-causal -> its exact cache, else prefix
    OFF = "off"  # every step runs [prefix | prompt | response]
    PREFIX = "prefix"  # the shared prefix's K/V computed once, in pages, read by every row
    # Block cache: each row's K/V in pages, refreshed by one forward at each block's first
    # step; the block's other steps run only the block's tokens against them.
    BLOCKS = "blocks"  # refresh over [prefix | prompt | response]: the prefix in the row's context, as trained
    PREFIX_BLOCKS = "prefix+blocks"  # the shared prefix pages of PREFIX, refresh over [prompt | response]

    @property
    def block_cache(self) -> bool:
        return self in (CacheMode.BLOCKS, CacheMode.PREFIX_BLOCKS)

    @property
    def shares_prefix(self) -> bool:
        """The prefix is encoded once, attending only to itself, and shared by every row."""
        return self in (CacheMode.PREFIX, CacheMode.PREFIX_BLOCKS)

    @classmethod
    def concrete(cls) -> list["CacheMode"]:
        """The modes an engine runs (every one but ``auto``), for tables and parametrised tests."""
        return [m for m in cls if m is not cls.AUTO]

    def resolve(self, card) -> "CacheMode":
        """The concrete mode an engine runs for a model of family card ``card`` (read by its
        ``attention``): ``auto`` is ``blocks`` for a block-causal card (whose every mode but
        ``off`` is its exact block-causal cache, each row's K/V in pages, one block a step)
        and ``prefix`` for a bidirectional one; any other mode is itself. The one place
        ``auto`` is decided: the engine, the job's summary and card, and ``validate`` ask it."""
        if self is not CacheMode.AUTO:
            return self
        return CacheMode.BLOCKS if _block_causal(card) else CacheMode.PREFIX

    def describe(self, card) -> str:
        """This mode as the engine runs it, for people: ``auto -> prefix``, or ``auto ->
        blocks (exact block-causal cache)``; ``card`` None (a model not seen here): ``auto``
        with where it gets resolved."""
        if card is None:
            return f"{self.value} (resolved from the model's card where it loads)" if self is CacheMode.AUTO \
                else self.value
        mode = self.resolve(card)
        text = f"auto -> {mode.value}" if self is CacheMode.AUTO else mode.value
        return f"{text} (exact block-causal cache)" if mode is not CacheMode.OFF and _block_causal(card) else text


def _block_causal(card) -> bool:
    """``card`` (a ``model.family.FamilyCard``, read without importing the model layer) attends block-causally."""
    return getattr(card.attention, "value", card.attention) == "block-causal"


# The KV pages' budget when none is given (``Engine(kv_budget=None)``): a fraction of free
# memory on a GPU, bytes on a CPU (whose free memory is the whole machine's).
DEFAULT_KV_BUDGET = {"cuda": 0.1, "cpu": 256 * 2**20}


def _setting(default, help: str, **bounds):
    """A field with its help text and bounds (gt, ge, le), read by the spec and the CLI."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class SamplingParams:
    steps: int = _setting(32, "forward passes per sample (fixed schedule); fewer = faster, lower quality", gt=0)
    gen_length: int = _setting(32, "response tokens (the answer plus EOS padding); cost grows with it", gt=0)
    block_length: int = _setting(32, "semi-autoregressive block; gen_length must be a multiple; smaller blocks "
                                     "read better on small models", gt=0)
    temperature: float = _setting(0.0, "0 = greedy; > 0 = Gumbel noise in float64 (per-sample seeds keep it "
                                       "reproducible)", ge=0)
    cfg_scale: float = _setting(0.0, "classifier-free guidance; > 0 doubles the compute and needs the prefix "
                                     "to be masked too (cache off)", ge=0)
    remasking: Remasking = _setting(Remasking.LOW_CONFIDENCE, "which predictions a step keeps: the most "
                                                              "confident (low_confidence) or random ones")
    threshold: float | None = _setting(None, "confidence-threshold parallel decoding: every prediction above it "
                                             "is kept (far fewer steps, small quality cost); unset = fixed "
                                             "schedule", gt=0, le=1)
    early_stop: bool = _setting(True, "stop a sample once its text up to the first EOS is final (same text, "
                                      "fewer steps)")
    suppress_eos: bool = _setting(False, "forbid EOS: every sample runs to gen_length")
    zero_eos_confidence: bool = _setting(False, "EOS predictions get confidence 0, so they are unmasked last")
    alg: Alg | None = _setting(None, "Dream's own sampler (origin, maskgit_plus, topk_margin, entropy): its "
                                     "timestep schedule over each block's steps (one block = its reference); "
                                     "unset = the block schedule with `remasking`")
    alg_temp: float | None = _setting(None, "with alg: positions drawn from softmax(confidence / alg_temp) "
                                            "instead of the most confident (more diverse, less accurate); "
                                            "unset or 0 = the most confident", ge=0)
    transfer_rule: TransferRule | None = _setting(None, "how many positions a step unmasks: spread (LLaDA 1.x, "
                                                        "LLaDA-MoE, Dream) or block_schedule (LLaDA 2.0); unset = "
                                                        "the model family's own rule")
    editing_threshold: float | None = _setting(None, "LLaDA 2.1 token editing: a decoded token of the current block "
                                                     "is replaced when the new prediction differs with probability "
                                                     "above this; one token unmasked per step at least (steps is "
                                                     "ignored); unset = no editing", gt=0, le=1)
    max_post_steps: int = _setting(16, "LLaDA 2.1: at most this many editing passes after a block is unmasked "
                                       "(more = more revisions, more forwards)", ge=0)

    def __post_init__(self) -> None:
        for name, kind in (("remasking", Remasking), ("alg", Alg), ("transfer_rule", TransferRule)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    raise ParamsError(f"{name}: {value!r} is not one of {', '.join(m.value for m in kind)}") from None
        problems = self.problems()
        if problems:
            raise ParamsError("; ".join(f"{name}: {msg}" for name, msg in problems))

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def editing(self) -> bool:
        """LLaDA 2.1's rule: decoded tokens may be replaced; one token a step at least, steps ignored."""
        return self.editing_threshold is not None

    def problems(self) -> list[tuple[str, str]]:
        """Every (field, what is wrong) at once: bounds first, then how the fields fit together."""
        out = []
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or not ({"gt", "ge", "le"} & set(meta)):
                continue
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                out.append((f.name, f"must be an integer, got {value!r}"))
            elif "gt" in meta and not value > meta["gt"]:
                out.append((f.name, f"must be > {meta['gt']}, got {value!r}"))
            elif "ge" in meta and not value >= meta["ge"]:
                out.append((f.name, f"must be >= {meta['ge']}, got {value!r}"))
            elif "le" in meta and not value <= meta["le"]:
                out.append((f.name, f"must be <= {meta['le']}, got {value!r}"))
        if out:
            return out
        if self.gen_length % self.block_length:
            out.append(("gen_length", f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}"))
        elif self.steps % self.num_blocks:
            out.append(("steps", f"steps={self.steps} is not a multiple of the number of blocks ({self.num_blocks} = "
                                 f"gen_length / block_length)"))
        if self.alg_temp is not None and self.alg is None:
            out.append(("alg_temp", "needs alg (it tempers how Dream's sampler draws positions)"))
        if self.alg is not None and self.threshold is not None:
            out.append(("threshold", f"alg={self.alg.value} sets its own schedule; a threshold replaces it: "
                                     f"set one of them"))
        if self.alg is not None and (self.editing_threshold is not None or self.transfer_rule is TransferRule.BLOCK_SCHEDULE):
            out.append(("alg", f"alg={self.alg.value} is Dream's sampler; transfer_rule and editing_threshold are "
                               f"LLaDA 2.x's: set one family's settings"))
        if self.alg is not None and self.remasking is not Remasking.LOW_CONFIDENCE:
            out.append(("remasking", f"alg={self.alg.value} chooses the positions itself; remasking applies "
                                     f"without alg"))
        if self.steps > self.gen_length:
            out.append(("steps", f"steps={self.steps} > gen_length={self.gen_length}: a step must unmask at least one "
                                 f"token"))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["remasking"] = self.remasking.value
        d["alg"] = None if self.alg is None else self.alg.value
        d["transfer_rule"] = None if self.transfer_rule is None else self.transfer_rule.value
        return d


# Settings added after outputs were first written: a fingerprint leaves them out at their
# default, so those outputs keep theirs.
LATER_SETTINGS = ("transfer_rule", "editing_threshold", "max_post_steps")


def settings() -> list:
    """The user settings of ``SamplingParams`` (name, type, default, metadata help and bounds)."""
    return list(fields(SamplingParams))
