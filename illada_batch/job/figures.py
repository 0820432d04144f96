"""The plots of the dataset card, drawn when a job finishes (DESIGN.md, "Sight"):

    throughput.png      tokens/s over time, overall and per replica (from the manifests' stats)
    lengths.png         the distribution of generated lengths (``num_tokens``)
    finish_reasons.png  samples by ``finish_reason``
    errors.png          error rows by cause (the error text without its values), when any

The counts of the last three are the manifests' (each replica counts the shard it writes),
summed; only shards whose manifests were written before they carried counts are read
(``card_counts.py``). matplotlib is imported here only, with the Agg backend; each PNG carries
``PNG_MARK`` in its text chunks, which is how ``commit.Output`` tells the job's own plots
from a user's file.
"""

from __future__ import annotations

import io

import numpy as np

from illada_batch.job.card_counts import card_counts
from illada_batch.job.records import Manifest

PNG_MARK = "written by illada-batch"
FOLDER = "_card"
BINS = 40  # time bins of the throughput plot


def throughput(manifests: list[Manifest], bins: int = BINS) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(seconds since the first shard started at each bin's middle, {replica: tokens/s per
    bin}): each shard's tokens spread evenly over its time on its replica (started .. commit)."""
    spans = [(m.stats.started or m.committed_at - m.stats.seconds, m.committed_at, m.stats.tokens,
              f"{m.stats.node}:{m.stats.pid}") for m in manifests]
    t0, t1 = min(s for s, _, _, _ in spans), max(e for _, e, _, _ in spans)
    edges = np.linspace(t0, max(t1, t0 + 1e-3), bins + 1)
    width = edges[1] - edges[0]
    rates: dict[str, np.ndarray] = {}
    for start, end, tokens, replica in spans:
        end = max(end, start + 1e-6)
        overlap = np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], start), 0, None)
        rates.setdefault(replica, np.zeros(bins))
        rates[replica] += tokens * overlap / (end - start) / width
    return (edges[:-1] + width / 2) - t0, rates


def card_figures(fs, root: str, manifests: list[Manifest]) -> dict[str, tuple[str, bytes]]:
    """{file name under ``FOLDER``: (title, PNG bytes)} for the card of the output at ``root``."""
    if not manifests:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_MARK})
        return buf.getvalue()

    figures = {}
    t, rates = throughput(manifests)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(t, sum(rates.values()), color="black", linewidth=2, label="all replicas")
    for replica, r in sorted(rates.items())[:20]:
        ax.plot(t, r, linewidth=1, alpha=0.7, label=f"replica {replica}")
    ax.set(xlabel="seconds since the first shard started", ylabel="tokens/s", title="Throughput")
    ax.legend(fontsize="small", loc="upper right")
    figures["throughput.png"] = ("Tokens/s over time, overall and per replica", png(fig))
    lengths, reasons, causes = card_counts(fs, root, manifests)
    for name, title, counts, xlabel in (
            ("lengths.png", "Generated lengths (num_tokens)", lengths, "num_tokens"),
            ("finish_reasons.png", "Samples by finish_reason", reasons, None),
            ("errors.png", "Error rows by cause", causes, None)):
        if not counts:
            continue
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.subplots()
        if xlabel is not None:
            keys = sorted(counts)
            ax.bar(keys, [counts[k] for k in keys], width=1.0)
            ax.set(xlabel=xlabel, ylabel="samples")
        else:
            top = counts.most_common(12)
            ax.barh([k for k, _ in top][::-1], [v for _, v in top][::-1])
            ax.set(xlabel="samples")
        ax.set(title=title)
        figures[name] = (title, png(fig))
    return figures
