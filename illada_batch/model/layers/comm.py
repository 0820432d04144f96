"""Opt-in timing of a tensor-parallel rank's collectives: how long each kind (all-reduce,
all-gather, the request broadcast, the end-of-run agreement) took in this process, how many
calls and how many bytes of payload.

Off by default, and then free: each collective checks one attribute (``COMM.on``) and calls
torch.distributed directly. On with ``COMM.on = True`` or ``ILLADA_COMM_TIMING=1`` in the
environment (ranks started as processes inherit it). A collective's time is the wall time
of the call on this rank: it includes waiting for the slowest rank to arrive, which is the
price a rank pays for the collective. On CUDA the device is synchronised before and after a
timed call (only when on), so the time is the collective's and not queued work's.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class CommClock:
    on: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def timed(self, kind: str, nbytes: int, call: Callable[[], object], cuda: bool = False):
        """``call()``, its wall time, call and ``nbytes`` of payload added to ``kind``."""
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = call()
        if cuda:
            torch.cuda.synchronize()
        self.seconds[kind] += time.perf_counter() - t0
        self.calls[kind] += 1
        self.bytes[kind] += nbytes
        return out

    def take(self) -> dict:
        """This rank's tallies so far, as plain dicts (then reset to zero)."""
        out = {kind: {"seconds": self.seconds[kind], "calls": self.calls[kind], "bytes": self.bytes[kind]}
               for kind in self.calls}
        self.seconds.clear()
        self.calls.clear()
        self.bytes.clear()
        return out


COMM = CommClock(on=os.environ.get("ILLADA_COMM_TIMING") == "1")


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()
