"""What each step moves, counted by the code that moves it: a ``Traffic`` the engine opens
around its work (``counting``) and the model, the attention and the KV cache report into.

Units are the schedule's, not bytes of one width: query tokens through the blocks, output
head positions, forward calls (each reads every weight once), and per layer the (query,
key) pairs attended and the K/V *token-layers* (one token's K and V of one layer) read from
pages, written into pages and copied (gathered out of pages, concatenated, scattered,
repeated for grouped heads). ``bench/roofline.py`` prices them at any model shape and
dtype, so a CPU run of a small model yields the same step sequence a GPU would run at
LLaDA-8B's width. Nothing is counted when no ``Traffic`` is open.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Step:
    """One engine step's work (one iteration: every forward it ran). Layer quantities are
    summed over the layers that ran (``layers`` of them each)."""

    forwards: int = 0  # model calls: each reads every weight once
    layers: int = 0  # layers per forward
    query_tokens: int = 0  # positions through the blocks, padding included
    logit_positions: int = 0  # positions through the output head
    attn_pairs: int = 0  # (query, key) pairs per head, summed over layers
    kv_read: int = 0  # K/V token-layers attended from pages or this call's own K/V
    kv_written: int = 0  # K/V token-layers stored into pages
    copied: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # kind -> K/V token-layers copied

    @property
    def kv_copied(self) -> int:
        return sum(self.copied.values())

    def empty(self) -> bool:
        return not (self.forwards or self.kv_written or self.kv_copied)


@dataclass
class Traffic:
    steps: list[Step] = field(default_factory=list)
    current: Step = field(default_factory=Step)

    def end_step(self) -> None:
        """Close the current step (an empty one is dropped)."""
        if not self.current.empty():
            self.steps.append(self.current)
        self.current = Step()

    def total(self, key: str) -> int:
        """A field summed over every closed step (``kv_copied`` included)."""
        return sum(getattr(s, key) for s in self.steps + [self.current])


_OPEN: ContextVar[Traffic | None] = ContextVar("illada_traffic", default=None)


@contextlib.contextmanager
def counting(traffic: Traffic) -> Iterator[Traffic]:
    token = _OPEN.set(traffic)
    try:
        yield traffic
    finally:
        _OPEN.reset(token)


def step() -> Step | None:
    """The open step to report into, or None when nothing is counting."""
    t = _OPEN.get()
    return None if t is None else t.current


def copied(kind: str, token_layers: int) -> None:
    """Report a K/V copy of ``token_layers`` token-layers (``kind``: gather, concat, scatter, repeat)."""
    s = step()
    if s is not None and token_layers:
        s.copied[kind] += token_layers


def attended(pairs: int, kv_read: int) -> None:
    """Report one layer's attention: (query, key) pairs per head and K/V token-layers read."""
    s = step()
    if s is not None:
        s.attn_pairs += pairs
        s.kv_read += kv_read
