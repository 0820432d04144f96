"""What a tensor-parallel step's collectives would take on GPUs: analytic, not measured.

A ring all-reduce of B bytes over N ranks sends 2(N-1)/N x B from each rank, an all-gather
whose result is B bytes sends (N-1)/N x B; each call also pays a fixed latency. Bandwidths
are published per-direction peaks (NCCL reaches less); latencies are typical small-message
NCCL figures on one node, assumed, not measured here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s a GPU sends, one direction, published peak
    latency: float  # seconds a collective call costs at any size (assumed)


LINKS = {"NVLink 4 (H100 SXM, 450 GB/s)": Link(450e9, 10e-6),
         "PCIe 5.0 x16 (64 GB/s)": Link(64e9, 20e-6)}

SENT = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "broadcast": lambda n: 1.0, "agree": lambda n: (n - 1) / n}


def gpu_comm_seconds(per_step: dict, ranks: int, link: Link) -> float:
    """``per_step``: kind -> {"calls", "bytes"} of one step (bytes as ``layers/comm.py`` counts
    them: an all-reduce's tensor, an all-gather's whole result)."""
    return sum(c["calls"] * link.latency + SENT[kind](ranks) * c["bytes"] / link.bandwidth
               for kind, c in per_step.items())
