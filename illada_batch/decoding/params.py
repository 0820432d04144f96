"""Sampling parameters of the diffusion sampler, shared by the API, the engine and job specs."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from illada_batch.errors import ParamsError


class Remasking(str, enum.Enum):
    """Which predictions of a step are kept: the most confident, or random ones."""

    LOW_CONFIDENCE = "low_confidence"
    RANDOM = "random"


class CacheMode(str, enum.Enum):
    """What an engine keeps between steps (see the engine's design note)."""

    OFF = "off"  # every step runs [prefix | prompt | response]
    PREFIX = "prefix"  # the shared prefix's K/V computed once, in pages, read by every row


@dataclass(frozen=True)
class SamplingParams:
    steps: int = 128  # forward passes per sample (fixed schedule); more = better, slower
    gen_length: int = 128  # response length in tokens (the answer plus EOS padding)
    block_length: int = 128  # semi-autoregressive block; gen_length must be a multiple
    temperature: float = 0.0  # 0 = greedy; > 0 = Gumbel noise in float64
    cfg_scale: float = 0.0  # classifier-free guidance; > 0 doubles the compute
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    threshold: float | None = None  # confidence-threshold parallel decoding (None = fixed schedule)
    early_stop: bool = False  # a row whose text already ends in EOS stops costing steps
    suppress_eos: bool = False  # forbid EOS in the logits
    zero_eos_confidence: bool = False  # EOS/EoT predictions get confidence 0 (unmasked last)

    def __post_init__(self) -> None:
        object.__setattr__(self, "remasking", Remasking(self.remasking))
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ParamsError(msg)

        for name in ("steps", "gen_length", "block_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.gen_length % self.block_length:
            bad(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}")
        if self.steps % self.num_blocks:
            bad(f"steps={self.steps} is not a multiple of the number of blocks ({self.num_blocks} = gen_length / block_length)")
        if self.steps > self.gen_length:
            bad(f"steps={self.steps} > gen_length={self.gen_length}: a step must unmask at least one token")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            bad(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            bad(f"threshold must be in (0, 1], got {self.threshold}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["remasking"] = self.remasking.value
        return d
