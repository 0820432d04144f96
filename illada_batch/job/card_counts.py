"""The counts behind the dataset card's column plots: samples by generated length
(``num_tokens``, of rows without an error), by ``finish_reason`` ("none" for a null), and
error rows by cause (``error_cause``).

The replica counts its own shard when it writes it (``shard_counts``, into the manifest's
``ShardCounts``); the card sums the manifests (``card_counts``) and reads no data file,
except for shards whose manifests were written before they carried counts: those are read
(``column_counts``: ``READ_AHEAD`` files at once, three columns, counted by pyarrow a batch
at a time, only error rows one by one). Counters do not grow with the rows: lengths are
bounded by ``gen_length``, finish reasons are a few, causes are folded into "other" past
``MAX_CAUSES`` (in a shard, and again in the sum).
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc
import pyarrow.parquet as pq

from illada_batch.job.records import Manifest, ShardCounts

MAX_CAUSES = 1000
BATCH_ROWS = 1 << 16
READ_AHEAD = 16  # data files read at once
COLUMNS = ["num_tokens", "finish_reason", "error"]
Counts = tuple[Counter, Counter, Counter]  # (samples by num_tokens, by finish_reason, error rows by cause)


def error_cause(error: str) -> str:
    """An error row's cause: its text without quoted values, parentheses, numbers and what
    follows the first colon ("duplicate id 'x' (first seen at row 3 of a.parquet)" ->
    "duplicate id …")."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "…", error)
    text = re.sub(r"\([^)]*\)", "", text).split(": ", 1)[0]
    return " ".join(re.sub(r"\d+", "N", text).split())[:80] or "error"


def shard_counts(table) -> ShardCounts | None:
    """The counts of one shard's output rows (a pyarrow table), for its manifest; None for a
    table without the card's columns."""
    if not set(COLUMNS) <= set(table.column_names):
        return None
    counts: Counts = (Counter(), Counter(), Counter())
    for batch in table.select(COLUMNS).to_batches(max_chunksize=BATCH_ROWS):
        _count(batch, *counts)
    return ShardCounts.of(*counts)


def card_counts(fs, root: str, manifests: list[Manifest]) -> Counts:
    """The counts over every shard: summed from the manifests that carry them, read from the
    data files of those that do not (manifests written by older code)."""
    counts: Counts = (Counter(), Counter(), Counter())
    for m in manifests:
        if m.counts is not None:
            _add(counts, m.counts.counters())
    old = [m for m in manifests if m.counts is None]
    if old:
        _add(counts, column_counts(fs, root, old))
    return counts


def column_counts(fs, root: str, manifests: list[Manifest]) -> Counts:
    """The counts read from the data files of ``manifests``. ``READ_AHEAD`` files are read at
    once (on S3 one round trip per shard would otherwise be waited out) and counted in the
    order of ``manifests``."""
    counts: Counts = (Counter(), Counter(), Counter())
    paths = [f"{root.rstrip('/')}/{m.data_key}" for m in manifests]
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        for i in range(0, len(paths), READ_AHEAD):
            for batches in pool.map(lambda p: _batches(fs, p), paths[i:i + READ_AHEAD]):
                for batch in batches:
                    _count(batch, *counts)
    return counts


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
        _add_cause(causes, error_cause(e), 1)


def _add(into: Counts, counts: Counts) -> None:
    into[0].update(counts[0])
    into[1].update(counts[1])
    for cause, k in counts[2].items():
        _add_cause(into[2], cause, k)


def _add_cause(causes: Counter, cause: str, k: int) -> None:
    causes[cause if cause in causes or len(causes) < MAX_CAUSES else "other"] += k
