"""A simulated replica for the scale benchmark: the replica's actor interface (``start``,
``process``, ``close``) with no model. ``process`` makes the shard's output rows at once
(one per (row, sample), no input read) and commits them with the real storage code
(``Output.write_shard``), so the driver, the commit protocol and the store are measured
and the engine is not.

It can crash the driver: a subclass made by :func:`sim_replica` counts commits in a local
file and SIGKILLs the driver's process once ``crash_at`` shards are committed (the driver
and the replicas share a machine in the benchmark).
"""

from __future__ import annotations

import os
import signal
import time

import pyarrow as pa

from illada_batch.job.commit import Output
from illada_batch.job.records import Manifest, ShardStats
from illada_batch.job.rows import OUTPUT_SCHEMA
from illada_batch.job.shards import Shard
from illada_batch.job.spec import JobSpec
from illada_batch.job.storage import filesystem


class SimShardReplica:
    counter: str | None = None  # a local file: one byte appended per commit (across replicas)
    crash_at: int | None = None  # SIGKILL ``driver_pid`` when the counter reaches this
    driver_pid: int | None = None
    first_call: str | None = None  # a local file: the wall clock of the first shard handed out, written once

    def __init__(self, spec_json: str, output_url: str, fingerprint: str) -> None:
        self.spec = JobSpec.model_validate_json(spec_json)
        self.fingerprint = fingerprint
        self.out = Output(*filesystem(output_url, self.spec.output.storage_options))

    def start(self) -> dict:
        return {"node": os.uname().nodename, "pid": os.getpid()}

    def process(self, shard_dict: dict) -> Manifest:
        t0 = time.time()
        if self.first_call and not os.path.exists(self.first_call):
            with open(self.first_call, "a") as f:
                f.write(f"{t0}\n")
        shard = Shard.from_dict(shard_dict)
        n = self.spec.n
        ids = [f"{shard.shard_id}:{k}" for k in range(shard.num_rows) for _ in range(n)]
        table = _rows(ids, [j for _ in range(shard.num_rows) for j in range(n)])
        stats = ShardStats(len(ids), 0, len(ids), 0.0, time.time() - t0, t0, os.uname().nodename, os.getpid())
        manifest = self.out.write_shard(shard.shard_id, shard.row_range(), table, self.fingerprint, stats)
        if self.counter:
            fd = os.open(self.counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, b".")
            finally:
                os.close(fd)
            if self.crash_at is not None and os.path.getsize(self.counter) >= self.crash_at:
                try:
                    os.kill(self.driver_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return manifest

    def close(self) -> None:
        pass


def _rows(ids: list[str], samples: list[int]) -> pa.Table:
    """Output rows in the real schema (``rows.OUTPUT_SCHEMA``: the card's plots read it), each
    generated: one token, finished at the end of its text; the other columns null."""
    k = len(ids)
    given = {"sample_index": samples, "generation": ["x"] * k, "num_tokens": [1] * k, "steps": [1] * k,
             "finish_reason": ["eos"] * k}
    return pa.table([pa.array(ids, pa.string())] + [pa.array(given[f.name], f.type) if f.name in given
                                                     else pa.nulls(k, f.type) for f in OUTPUT_SCHEMA],
                    names=["id", *OUTPUT_SCHEMA.names])


def sim_replica(counter: str | None = None, crash_at: int | None = None, driver_pid: int | None = None,
                first_call: str | None = None):
    """The Ray actor class the driver starts in place of ``Replica`` (Ray ships it by value)."""
    import ray

    cls = type("SimReplica", (SimShardReplica,), {"counter": counter, "crash_at": crash_at,
                                                 "driver_pid": driver_pid, "first_call": first_call})
    return ray.remote(max_concurrency=2)(cls)
