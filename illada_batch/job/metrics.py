"""The job's counters and gauges through ``ray.util.metrics``: Ray exports them to
Prometheus from every node (``ray_illada_*``), and ``cluster/grafana-illada.json`` draws them.

Driver side (``DriverMetrics``): rows, samples, tokens, error rows, shards committed / failed /
retried, replicas wanted / placed / busy, tokens/s. Replica side (``ReplicaMetrics``, from the
engine's own stats after each shard): prefix page hit rate, row waits for KV pages, KV pages
in use. Every series carries the job's name as the ``job`` tag. Metrics are only made inside
a Ray process (``ray.is_initialized()``); elsewhere (a replica built in a plain test) each
call does nothing, except that counts made before Ray was up (the driver records bad input
files before it joins the cluster) are kept and added when ``attach()`` finds Ray.

A committed shard's counts are summed in the driver and recorded at most once a second
(``flush``, from the driver's loop, and at its end): each record is a call into Ray's core
worker, and at 10^5 shards five of them a shard were a tenth of the driver's CPU.
"""

from __future__ import annotations

import ray

COUNTERS = {
    "illada_rows": "input rows committed (each with its n samples)",
    "illada_samples": "output rows committed: one per (row, sample)",
    "illada_tokens": "generated tokens committed",
    "illada_error_rows": "committed output rows with `error` set",
    "illada_shards_committed": "shards committed",
    "illada_shards_failed": "shards recorded as failed after their retries",
    "illada_shards_retried": "shard retries scheduled",
    "illada_row_waits_for_pages": "times a row waited for KV pages to free (block cache modes)",
}
GAUGES = {
    "illada_replicas_wanted": "replicas the driver asks for",
    "illada_replicas_placed": "replicas Ray has placed (started or loading the model)",
    "illada_replicas_busy": "replicas with a shard in flight",
    "illada_tokens_per_second": "generated tokens per second of this run, from its start",
    "illada_prefix_page_hit_rate": "share of prefix pages read that were already in the cache (per replica)",
    "illada_kv_pages_in_use": "most KV pages held at once by rows and prefixes during the replica's last shard",
}


class _Metrics:
    def __init__(self, job: str, names: list[str]) -> None:
        self.job, self.names, self.m, self.pending = job, names, {}, {}
        self.attach()

    def attach(self) -> None:
        """Make the metrics once Ray is up, and add the counts kept until then."""
        if self.m or not ray.is_initialized():
            return
        from ray.util.metrics import Counter, Gauge

        for name in self.names:
            kind = Counter if name in COUNTERS else Gauge
            self.m[name] = kind(name, description=COUNTERS.get(name) or GAUGES[name], tag_keys=("job",))
            self.m[name].set_default_tags({"job": self.job})
        self.flush()

    def inc(self, name: str, value: float) -> None:
        if value <= 0:
            return
        if name in self.m:
            self.m[name].inc(value)
        else:
            self.pending[name] = self.pending.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        if name in self.m:
            self.m[name].set(value)

    def flush(self) -> None:
        """Record what ``add`` summed since the last flush."""
        if self.m:
            pending, self.pending = self.pending, {}
            for name, value in pending.items():
                self.inc(name, value)

    def add(self, name: str, value: float) -> None:
        """``inc`` at the next ``flush``."""
        self.pending[name] = self.pending.get(name, 0) + value


class DriverMetrics(_Metrics):
    def __init__(self, job: str) -> None:
        super().__init__(job, [n for n in [*COUNTERS, *GAUGES] if n not in _REPLICA])

    def committed(self, stats, rows: int) -> None:
        """One shard committed: its ``ShardStats`` and input row count (recorded at ``flush``)."""
        self.add("illada_shards_committed", 1)
        self.add("illada_rows", rows)
        self.add("illada_samples", stats.samples)
        self.add("illada_tokens", stats.tokens)
        self.add("illada_error_rows", stats.errors)

    def replicas(self, wanted: int, placed: int, busy: int, tokens_per_second: float) -> None:
        self.set("illada_replicas_wanted", wanted)
        self.set("illada_replicas_placed", placed)
        self.set("illada_replicas_busy", busy)
        self.set("illada_tokens_per_second", tokens_per_second)


_REPLICA = {"illada_row_waits_for_pages", "illada_prefix_page_hit_rate", "illada_kv_pages_in_use"}


class ReplicaMetrics(_Metrics):
    def __init__(self, job: str) -> None:
        super().__init__(job, sorted(_REPLICA))
        self.waits = 0

    def engine(self, engine) -> None:
        """Read the engine's stats (``counters``, and its page pool where it has one)."""
        c = getattr(engine, "counters", None)
        if c is not None:
            self.inc("illada_row_waits_for_pages", c.row_waits - self.waits)
            self.waits = c.row_waits
            if c.prefix_pages_read:
                self.set("illada_prefix_page_hit_rate", 1 - c.prefix_pages_missed / c.prefix_pages_read)
            if getattr(engine, "pool", None) is not None:
                self.set("illada_kv_pages_in_use", c.pages_in_use_peak)
                c.pages_in_use_peak = 0  # the next shard's peak
