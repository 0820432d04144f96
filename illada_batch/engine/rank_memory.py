"""A process's memory, as a tensor-parallel rank reports it (``tensor_parallel.rank_report``):
on CPU its resident set now and at its peak since the last reset (Linux ``/proc/self/status``:
VmRSS, VmHWM; the anonymous and file-backed parts of VmRSS), on CUDA the device memory
torch allocated now and at its peak."""

from __future__ import annotations

import torch

_FIELDS = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}


def memory() -> dict[str, int]:
    """Bytes: ``rss`` and ``peak`` (and ``anon``, ``file`` on CPU); {} where not known."""
    if torch.cuda.is_available():
        return {"rss": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}
    try:
        with open("/proc/self/status") as f:
            return {_FIELDS[k]: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in _FIELDS}
    except OSError:
        return {}


def reset_peak() -> None:
    """Start a new peak from the memory in use now."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM on Linux
    except OSError:
        pass
