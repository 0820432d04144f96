"""The plots of the dataset card, drawn when a job finishes (DESIGN.md, "Sight"):

    throughput.png      tokens/s over time, overall and per replica (from the manifests' stats)
    lengths.png         the distribution of generated lengths (``num_tokens``)
    finish_reasons.png  samples by ``finish_reason``
    errors.png          error rows by cause (the error text without its values), when any

The data files are read ``READ_AHEAD`` at once, three columns (``num_tokens``,
``finish_reason``, ``error``), and counted by pyarrow a batch at a time (only error rows one
by one), into counters whose size does not grow with the rows: lengths are
bounded by ``gen_length``, finish reasons are a few, causes are folded into "other" past
``MAX_CAUSES``. matplotlib is imported here only, with the Agg backend; each PNG carries
``PNG_MARK`` in its text chunks, which is how ``commit.Output`` tells the job's own plots
from a user's file.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from illada_batch.job.records import Manifest

PNG_MARK = "written by illada-batch"
FOLDER = "_card"
MAX_CAUSES = 1000
BINS = 40  # time bins of the throughput plot
BATCH_ROWS = 1 << 16
READ_AHEAD = 16  # data files read at once
COLUMNS = ["num_tokens", "finish_reason", "error"]


def error_cause(error: str) -> str:
    """An error row's cause: its text without quoted values, parentheses, numbers and what
    follows the first colon ("duplicate id 'x' (first seen at row 3 of a.parquet)" ->
    "duplicate id …")."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "…", error)
    text = re.sub(r"\([^)]*\)", "", text).split(": ", 1)[0]
    return " ".join(re.sub(r"\d+", "N", text).split())[:80] or "error"


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


def column_counts(fs, root: str, manifests: list[Manifest]) -> tuple[Counter, Counter, Counter]:
    """(samples by num_tokens, by finish_reason, error rows by cause) over the data files.
    ``READ_AHEAD`` files are read at once (on S3 the driver would otherwise wait out one round
    trip per shard) and counted in the order of ``manifests``, a batch at a time by pyarrow:
    only error rows are seen one by one (their cause is a text pattern)."""
    lengths, reasons, causes = Counter(), Counter(), Counter()
    paths = [f"{root.rstrip('/')}/{m.data_key}" for m in manifests]
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        for i in range(0, len(paths), READ_AHEAD):
            for batches in pool.map(lambda p: _batches(fs, p), paths[i:i + READ_AHEAD]):
                for batch in batches:
                    _count(batch, lengths, reasons, causes)
    return lengths, reasons, causes


def _batches(fs, path: str) -> list:
    with fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS))


def _count(batch, lengths: Counter, reasons: Counter, causes: Counter) -> None:
    tokens, reason, error = (batch.column(c) for c in COLUMNS)
    for counts, values in ((lengths, pc.filter(tokens, pc.and_(pc.is_null(error), pc.is_valid(tokens)))),
                           (reasons, pc.fill_null(reason, "none"))):
        for v in pc.value_counts(values).to_pylist():
            counts[v["values"]] += v["counts"]
    for e in pc.drop_null(error).to_pylist():
        c = error_cause(e)
        causes[c if c in causes or len(causes) < MAX_CAUSES else "other"] += 1


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
    lengths, reasons, causes = column_counts(fs, root, manifests)
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
