"""The typed records that cross files of the job layer.

    ShardStats   what a replica measured on one shard (replica -> manifest -> driver)
    ShardCounts  the card's counts of one shard's rows (replica -> manifest -> card)
    RowRange     which input rows a shard holds (plan -> manifest -> resume check)
    Manifest     one committed shard: ``_manifest/<shard>.json``
    JobSummary   the job's state, computed from the output alone: the closing table,
                 ``status``, ``_SUCCESS.json`` / ``_FAILED.json`` and the exit code

A summary is a function of what the output holds (manifests, failure records) and of the
error budget, never of which run computed it: a re-run of a finished job prints the same
verdict and exits with the same code as the run that finished it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True, slots=True)
class ShardStats:
    samples: int  # output rows written: rows x n
    errors: int  # of those, rows with `error` set
    tokens: int  # generated tokens
    gen_seconds: float  # time in the engine
    seconds: float  # read + render + generate + write
    started: float  # wall clock when the replica took the shard
    node: str
    pid: int


@dataclass(frozen=True, slots=True)
class ShardCounts:
    """A shard's samples by generated length, by finish reason, and error rows by cause
    (``card_counts.py``). Lengths, which can be as many as ``gen_length``, are one text of
    ``length:count`` pairs, by length, space-separated ("1:4 7:2"): about 5 bytes a length in
    the driver (10^5 manifests at its summary), a third of a tuple's. Reasons and causes, a few,
    are flat tuples ``(key, count, key, count, ...)`` by key, their keys interned. All encode as
    plain JSON (a text, lists)."""
    lengths: str = ""
    finish_reasons: tuple = ()
    causes: tuple = ()

    @classmethod
    def of(cls, lengths: Counter, reasons: Counter, causes: Counter) -> "ShardCounts":
        return cls(" ".join(f"{k}:{lengths[k]}" for k in sorted(lengths)),
                   *(tuple(x for k in sorted(c) for x in (k, c[k])) for c in (reasons, causes)))

    def counters(self) -> tuple[Counter, Counter, Counter]:
        lengths = Counter({int(k): int(v) for k, v in (pair.split(":") for pair in self.lengths.split())})
        return (lengths, *(Counter(dict(zip(flat[::2], flat[1::2]))) for flat in (self.finish_reasons, self.causes)))

    @classmethod
    def from_json(cls, body: dict) -> "ShardCounts":
        return cls(_shared(body.get("lengths", "")),
                   *(tuple(_shared(x) for x in body.get(f, ())) for f in ("finish_reasons", "causes")))


@dataclass(frozen=True, slots=True)
class RowRange:
    """Rows ``row_start .. row_start + num_rows - 1`` of ``file`` as it was when planned:
    ``file_size`` and ``file_version`` (the S3 ETag, or the local mtime) tell a file that
    grew or was replaced from the one a manifest was made from."""
    file: str
    file_size: int
    file_version: str | None
    row_start: int
    num_rows: int

    def describe(self) -> str:
        return f"rows {self.row_start}-{self.row_start + self.num_rows - 1} of {self.file}"

    def difference(self, other: "RowRange") -> str | None:
        """Why ``other`` (the plan's) is not this range (a manifest's), or None when it is."""
        if self.file != other.file:
            return f"it covers {self.describe()}, the plan has {other.describe()}"
        if (self.file_size, self.file_version) != (other.file_size, other.file_version):
            return (f"{self.file} changed since it was committed (size {self.file_size} -> {other.file_size}, "
                    f"version {self.file_version} -> {other.file_version})")
        if (self.row_start, self.num_rows) != (other.row_start, other.num_rows):
            return (f"it covers {self.describe()}, the plan has {other.describe()} (did shard_rows change?)")
        return None


@dataclass(frozen=True, slots=True)
class Manifest:
    shard_id: str
    data_key: str  # data/part-<shard>-<attempt>.parquet, relative to the output root
    samples: int  # rows in the data file (input rows x n); older manifests called it `rows`
    sha256: str  # of the data file
    fingerprint: str
    committed_at: float
    rows: RowRange | None  # None only in manifests written before row ranges existed
    stats: ShardStats
    # the data file as written: a status or resume finds it with this size (and, on S3, the ETag
    # the store gave it) or does not trust the shard; None in manifests written before they were
    data_size: int | None = None
    data_etag: str | None = None
    # offsets of the shard's rows written as error rows because another shard's row has their
    # id: these rows do not hold their id in the output (the next run's duplicate check)
    duplicate_rows: tuple[int, ...] = ()
    # the card's counts of the shard's rows; None in manifests written before they were (the card
    # reads those shards' data files)
    counts: ShardCounts | None = None

    def to_json(self) -> bytes:
        """``json.dumps(asdict(self))``, byte for byte (the index checks a manifest by its bytes'
        MD5), without ``asdict``'s deep copies: the driver encodes every manifest it receives."""
        body = {f: getattr(self, f) for f in _MANIFEST_FIELDS}
        body["rows"] = None if self.rows is None else {f: getattr(self.rows, f) for f in _ROW_FIELDS}
        body["stats"] = {f: getattr(self.stats, f) for f in _STATS_FIELDS}
        body["counts"] = None if self.counts is None else {f: getattr(self.counts, f) for f in _COUNTS_FIELDS}
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, body: dict) -> "Manifest":
        """From a manifest's JSON. The texts that many manifests repeat (fingerprint, input file
        and its version, node) are interned: a driver holds 10^5 manifests at its summary."""
        if "stats" not in body:  # the first format: stats merged into the top level, `rows` = samples
            stats = {f.name: body.get(f.name, 0) for f in fields(ShardStats)}
            stats["samples"] = body.get("samples", body.get("rows", 0))
            return cls(body["shard_id"], body["data_key"], stats["samples"], body["sha256"], _shared(body["fingerprint"]),
                       body["committed_at"], None, ShardStats(**{**stats, "node": _shared(stats["node"])}))
        rows = body.get("rows")
        rows = RowRange(**{**rows, "file": _shared(rows["file"]), "file_version": _shared(rows["file_version"])}) \
            if rows else None
        return cls(**{**body, "fingerprint": _shared(body["fingerprint"]), "rows": rows,
                      "stats": ShardStats(**{**body["stats"], "node": _shared(body["stats"]["node"])}),
                      "duplicate_rows": tuple(int(k) for k in body.get("duplicate_rows", ())),
                      "counts": ShardCounts.from_json(body["counts"]) if body.get("counts") is not None else None})


_MANIFEST_FIELDS = [f.name for f in fields(Manifest)]
_ROW_FIELDS = [f.name for f in fields(RowRange)]
_STATS_FIELDS = [f.name for f in fields(ShardStats)]
_COUNTS_FIELDS = [f.name for f in fields(ShardCounts)]


def _shared(text):
    return sys.intern(text) if isinstance(text, str) else text


@dataclass
class RunStats:
    """What this run did (the rest of a summary is the output's state)."""
    shards: int = 0  # committed by this run
    skipped: int = 0  # committed by an earlier run
    tokens: int = 0
    wall_seconds: float = 0.0
    gen_seconds: float = 0.0  # in the engines, summed over shards
    replica_seconds: float = 0.0  # each replica's busy time (overlapping shards counted once), summed
    orphans_removed: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.wall_seconds, 1e-9)


@dataclass
class JobSummary:
    output: str
    job: str | None = None  # None: read back from an output that holds no summary file
    fingerprint: str | None = None
    model: str | None = None
    backend: str | None = None
    sampling: dict = field(default_factory=dict)
    # engine.cache: how the tokens were computed, as resolved ("auto -> prefix"; None: a summary written before
    # it was kept)
    cache: str | None = None
    n: int = 1
    seed: int | None = None
    error_budget: float = 0.0  # the fraction of samples allowed an error for exit code 0
    shards: int | None = None  # planned (None: unknown to a reader without the spec)
    shards_committed: int = 0
    failed: dict = field(default_factory=dict)  # shard id -> error
    stopped: str | None = None  # why the job stopped before its shards were done (an unfixable error)
    samples: int = 0
    errors: int = 0
    tokens: int = 0
    this_run: RunStats | None = None
    host: str | None = None
    finished_at: float | None = None

    @property
    def rows(self) -> int:
        return self.samples // max(1, self.n)

    @property
    def empty(self) -> bool:
        return not self.shards_committed and not self.failed and self.job is None

    @property
    def complete(self) -> bool:
        """Every planned shard committed: every (row, sample) is in the output."""
        return self.shards is not None and self.shards_committed == self.shards and not self.stopped

    def verdict(self) -> str:
        """One line: 'complete', or what is wrong."""
        if self.empty:
            return f"no output at {self.output}"
        if self.stopped:
            return f"FAILED: stopped: {self.stopped}"
        if self.shards is None:
            return "INCOMPLETE: no summary (the job is running or was interrupted; a re-run resumes)"
        if not self.complete:
            missing = self.shards - self.shards_committed
            return (f"FAILED: {missing} of {self.shards} shards not committed ({len(self.failed)} failed; "
                    f"a re-run retries them)")
        if self.errors > self.error_budget * self.samples:
            return (f"FAILED: {self.errors:,} of {self.samples:,} samples have an error, over the error budget "
                    f"({self.error_budget:g} = {int(self.error_budget * self.samples):,} samples)")
        return "complete"

    @property
    def ok(self) -> bool:
        return self.verdict() == "complete"

    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(rows=self.rows, shards_failed=len(self.failed), status=self.verdict())
        if self.this_run is not None:
            d["this_run"]["tokens_per_second"] = round(self.this_run.tokens_per_second, 2)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, default=str).encode()

    @classmethod
    def from_dict(cls, d: dict) -> "JobSummary":
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in d.items() if k in known}
        if isinstance(body.get("this_run"), dict):
            run_fields = {f.name for f in fields(RunStats)}
            body["this_run"] = RunStats(**{k: v for k, v in body["this_run"].items() if k in run_fields})
        if "failed" not in body and isinstance(d.get("shards_failed"), int) and d["shards_failed"]:
            body["failed"] = {f"({d['shards_failed']} shards)": "failed"}  # the first format kept only a count
        return cls(**body)
