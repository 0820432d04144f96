"""The duplicate-id check in bounded memory: the same result and messages as
``shards.mark_duplicate_ids``, with no set of every id in the driver.

Pass 1 streams each file's id column (a batch at a time) and appends each id, as its
canonical text (``ids.canonical_id``: 7 and "7" are one id), with its position in the input
(its global row number: files in listing order, rows in file order) to one of B bucket files
in local scratch storage, chosen by a hash of the key. Pass 2 reads one bucket at a time: an
id's first row is its smallest rank, and every later row with that id is a repeat. So
the driver holds one batch, then one bucket (``BUCKET_IDS`` ids), never the whole column.

A row's rank is its position, less the number of input rows when its shard is already
committed in the output: committed rows claim their ids before every other row, in listing
order among themselves, are never marked, and the rows their manifest lists in
``duplicate_rows`` (written as error rows, not holding their id) are left out.
"""

from __future__ import annotations

import math
import os
import posixpath
import tempfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from illada_batch.errors import StorageUnavailable
from illada_batch.job.formats import is_text, read_text
from illada_batch.job.ids import canonical_id
from illada_batch.job.shards import Shard, _relative
from illada_batch.job.storage import filesystem, is_transient

BUCKET_IDS = 500_000  # ids per bucket: pass 2's memory (a hash aggregation over one bucket)
BATCH_ROWS = 1 << 16  # ids read at once in pass 1
_SCHEMA = pa.schema([("key", pa.string()), ("seq", pa.int64())])


def mark_duplicate_ids_bounded(url: str, storage_options: dict, shards: list[Shard], id_column: str,
                               threads: int = 8, scratch: str | None = None,
                               bucket_ids: int = BUCKET_IDS,
                               committed: dict | None = None) -> tuple[list[Shard], list[tuple[str, str]]]:
    """``shards.mark_duplicate_ids``, bucket by bucket (``scratch``: a local folder for the
    buckets, the system's temporary folder by default; ``committed``: {shard id: Manifest} of
    the shards already in the output). ``threads`` is accepted for the same signature; files
    are read one at a time."""
    committed = committed or {}
    fs, _ = filesystem(url, storage_options)
    by_file: dict[str, list[Shard]] = {}
    for s in shards:
        by_file.setdefault(s.path, []).append(s)
    paths = list(by_file)
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    sizes = [sum(s.num_rows for s in by_file[p]) for p in paths]
    file_base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global position of each file's row 0
    buckets = max(1, math.ceil(int(file_base[-1]) / bucket_ids))
    ranks = _Ranks(by_file, paths, file_base, committed)
    bad: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="illada-ids-", dir=scratch) as tmp:
        writers: dict[int, ipc.RecordBatchFileWriter] = {}
        try:
            for fi, path in enumerate(paths):
                try:
                    _spill(fs, path, id_column, int(file_base[fi]), buckets, writers, tmp, ranks)
                except Exception as exc:  # noqa: BLE001 - corrupt data pages behind a good footer
                    if is_transient(exc):
                        raise StorageUnavailable(f"{path}: cannot read column {id_column!r} ({type(exc).__name__}: "
                                                 f"{exc}); nothing was started") from None
                    bad[fi] = f"{path}: cannot read column {id_column!r} ({type(exc).__name__}: {exc})"
        finally:
            for w in writers.values():
                w.close()
        repeats = [_repeats(os.path.join(tmp, f"{b}.arrow"), file_base, set(bad)) for b in sorted(writers)]
    none = np.zeros(0, np.int64)
    seq, first = (np.concatenate([r[i] for r in repeats] or [none]) for i in (0, 1))
    return (_marked(by_file, paths, root, file_base, bad, seq, first, committed),
            [(paths[i], e) for i, e in sorted(bad.items())])


class _Ranks:
    """Each row's rank from its position: its position, less ``total`` (the number of input
    rows) when its shard is committed; -1 - ``total`` for the rows that claim nothing (those
    a committed shard's manifest lists in ``duplicate_rows``)."""

    def __init__(self, by_file: dict, paths: list[str], file_base: np.ndarray, committed: dict):
        self.total = int(file_base[-1])
        spans = sorted((int(file_base[fi]) + s.row_start, s) for fi, p in enumerate(paths) for s in by_file[p])
        self.starts = np.array([start for start, _ in spans], dtype=np.int64)
        self.committed = np.array([s.shard_id in committed for _, s in spans], dtype=bool)
        self.unclaimed = np.array(sorted(start + k for start, s in spans if s.shard_id in committed
                                         for k in committed[s.shard_id].duplicate_rows), dtype=np.int64)

    def of(self, seq: np.ndarray) -> np.ndarray:
        if not self.committed.any():
            return seq
        shard = np.searchsorted(self.starts, seq, side="right") - 1
        rank = np.where(self.committed[shard], seq - self.total, seq)
        return np.where(np.isin(seq, self.unclaimed), -1 - self.total, rank)


def _id_batches(fs, path: str, id_column: str):
    if is_text(path):
        yield read_text(fs, path).column(id_column).combine_chunks()
        return
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=[id_column]):
            yield batch.column(0)


def _keys(ids: pa.Array, column: str) -> pa.Array:
    """Each id's canonical text (``ids.canonical_id``), null where the row has none: integers
    and text cast at once, other types (bytes, unions) row by row."""
    t = ids.type
    if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(ids, pa.string())
    return pa.array([canonical_id(v, column)[0] for v in ids.to_pylist()], pa.string())


def _spill(fs, path: str, id_column: str, base: int, buckets: int, writers: dict, tmp: str, ranks: _Ranks) -> None:
    row = base
    for ids in _id_batches(fs, path, id_column):
        seq = ranks.of(np.arange(row, row + len(ids), dtype=np.int64))
        row += len(ids)
        keys = _keys(ids, id_column)
        # rows without an id are left to the row check; rows that claim nothing are left out
        valid = pc.is_valid(keys).to_numpy(zero_copy_only=False) & (seq >= -ranks.total)
        keys, seq = keys.filter(pa.array(valid)), seq[valid]
        if not len(keys):
            continue
        bucket = np.fromiter((hash(k) % buckets for k in keys.to_pylist()), np.int64, len(keys))
        order = np.argsort(bucket, kind="stable")
        keys, seq, bucket = keys.take(pa.array(order)), seq[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(buckets + 1))
        for b in range(buckets):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if lo == hi:
                continue
            if b not in writers:
                writers[b] = ipc.new_file(os.path.join(tmp, f"{b}.arrow"), _SCHEMA)
            writers[b].write_batch(pa.record_batch([keys.slice(lo, hi - lo), pa.array(seq[lo:hi])], schema=_SCHEMA))


def _repeats(bucket_file: str, file_base: np.ndarray, bad: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(position of each repeated row, rank of its id's first row) in one bucket, ignoring
    the rows of unreadable files; the rows of committed shards (negative ranks) are never
    repeats."""
    total = int(file_base[-1])
    with ipc.open_file(bucket_file) as r:
        table = r.read_all()
    if bad:
        rank = table.column("seq").to_numpy()
        file_of = np.searchsorted(file_base, np.where(rank < 0, rank + total, rank), side="right") - 1
        table = table.filter(pa.array(~np.isin(file_of, list(bad))))
    firsts = table.group_by("key").aggregate([("seq", "min")])
    joined = table.join(firsts, "key")
    repeated = joined.filter(pc.and_(pc.not_equal(joined.column("seq"), joined.column("seq_min")),
                                     pc.greater_equal(joined.column("seq"), 0)))
    return repeated.column("seq").to_numpy(), repeated.column("seq_min").to_numpy()


def _marked(by_file: dict, paths: list[str], root: str, file_base: np.ndarray, bad: dict, seq: np.ndarray,
            rank: np.ndarray, committed: dict) -> list[Shard]:
    """The shards of the readable files, each with its repeats (offset, "row R of FILE", and
    the shard that holds it when that one is committed)."""
    first = np.where(rank < 0, rank + int(file_base[-1]), rank)
    kept = [s for i, p in enumerate(paths) if i not in bad for s in by_file[p]]
    index = {p: i for i, p in enumerate(paths)}
    starts = np.array([file_base[index[s.path]] + s.row_start for s in kept], dtype=np.int64)
    shard_of, first_shard = (np.searchsorted(starts, x, side="right") - 1 for x in (seq, first))
    other = shard_of != first_shard  # repeats inside one shard: the row check reports them
    order = np.argsort(seq[other], kind="stable")
    dups: dict[int, list[tuple[int, str]]] = {}
    for d, f, k, h in zip(*(x[other][order] for x in (seq, first, shard_of, first_shard))):
        fi = int(np.searchsorted(file_base, f, side="right") - 1)
        where = f"row {int(f - file_base[fi])} of {_relative(paths[fi], root)}"
        holder = kept[int(h)].shard_id
        if holder in committed:
            where += f", already in the output in shard {holder}"
        dups.setdefault(int(k), []).append((int(d - starts[k]), where))
    return [replace(s, duplicates=tuple(dups[k])) if k in dups else s for k, s in enumerate(kept)]
