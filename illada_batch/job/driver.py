"""The Ray driver: lists shards, skips committed ones, hands shards to replicas that ask
for work, retries what failed, and writes the summary last. It imports no torch.

Design note. Each replica has at most two shards in flight (one running, one waiting at
the actor), so a fast replica simply comes back sooner for more (pull-based balancing). A replica that dies mid-shard is
restarted by Ray (``max_restarts``) or replaced; its shard goes back to the queue. A
shard that fails waits ``retry_backoff_s`` (doubling each try) before its retry; one that
fails ``max_retries + 1`` times, or whose file is bad, is recorded under ``_failed/`` with its
error and the job goes on. Only shard manifests count as done.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError

from illada_batch.errors import FingerprintMismatch, OutputError
from illada_batch.job.commit import LOCK_HEARTBEAT_SECONDS, Output
from illada_batch.job.progress import Progress, card, summary_table
from illada_batch.job.shards import Shard, mark_duplicate_ids, plan_shards
from illada_batch.job.spec import JobSpec
from illada_batch.job.storage import filesystem, storage_errors


@dataclass
class JobReport:
    output_url: str
    shards: int = 0
    committed: int = 0
    skipped: int = 0  # committed by an earlier run
    failed: dict = field(default_factory=dict)  # shard id -> error
    rows: int = 0
    samples: int = 0
    errors: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    gen_seconds: float = 0.0
    busy: dict = field(default_factory=dict)  # (node, pid) -> [(started, committed_at)] of its shards
    already_complete: bool = False

    @property
    def replica_seconds(self) -> float:
        """Seconds each replica spent on shards, summed over replicas; a replica works on two
        shards at once, so its time is the union of its shards' intervals."""
        total = 0.0
        for spans in self.busy.values():
            end = float("-inf")
            for a, b in sorted(spans):
                total += max(0.0, b - max(a, end))
                end = max(end, b)
        return total

    @property
    def ok(self) -> bool:
        return not self.failed

    def exit_code(self, error_budget: float) -> int:
        if self.failed:
            return 1
        return 0 if self.errors <= error_budget * max(1, self.samples) else 1


def run_job(spec: JobSpec, date: str | None = None, address: str | None = None, show_progress: bool = True,
            log=print) -> JobReport:
    """Run (or resume) a job; returns its report. Raises FingerprintMismatch or LockHeld
    before writing anything when the output belongs to another job or another run."""
    return _Job(spec.resolved(), date, log).run(address, show_progress)


class _Job:
    def __init__(self, spec: JobSpec, date: str | None, log) -> None:
        self.spec, self.log, self.t0 = spec, log, time.time()
        self.out_url = spec.output_url(date)
        self.fingerprint = spec.fingerprint()
        self.out = Output(*filesystem(self.out_url, spec.output.storage_options))
        self.report = JobReport(self.out_url)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def run(self, address: str | None, show_progress: bool) -> JobReport:
        spec, report, out = self.spec, self.report, self.out
        with storage_errors(f"output.url {self.out_url}", OutputError, "cannot read", keep=(FingerprintMismatch,)):
            committed = out.check_fingerprint(self.fingerprint)
        i = spec.input
        shards, bad_files = plan_shards(i.url, i.storage_options, spec.shard_rows, i.columns(), i.id_column)
        todo = [s for s in shards if s.shard_id not in committed]
        if not todo and not bad_files and out.success() is not None:
            report.shards = report.committed = report.skipped = len(shards)
            report.already_complete = True
            self.log(f"{self.out_url}: already complete ({len(shards)} shards committed, fingerprint "
                     f"{self.fingerprint}); nothing to do")
            return report
        if i.check_duplicate_ids and shards:  # only when there is work: it reads a column of every file
            shards, unreadable = mark_duplicate_ids(i.url, i.storage_options, shards, i.id_column)
            bad_files += unreadable
            todo = [s for s in shards if s.shard_id not in committed]
            repeats = sum(len(s.duplicates) for s in todo)
            if repeats:
                self.log(f"input: {repeats:,} row(s) repeat the id of an earlier row; they are written as error rows")
        report.shards = len(shards) + len(bad_files)
        report.skipped = len(shards) - len(todo)
        out.acquire_lock(self.owner)  # LockHeld: another run is writing this output; nothing was touched
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(out, self.owner, stop), daemon=True)
        beat.start()
        try:
            for path, error in bad_files:
                sid = f"file-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{path.rsplit('/', 1)[-1]}"
                report.failed[sid] = error
                out.record_failure(sid, self.fingerprint, error, attempts=1)
                self.log(f"shard failed: {error}")
            if report.skipped:
                self.log(f"resuming: {report.skipped} of {len(shards)} shards already committed, {len(todo)} to go")
            if todo:
                self._dispatch(todo, address, show_progress)
            self._finish(len(shards))
        finally:
            stop.set()
            beat.join()
            out.release_lock(self.owner)
        return report

    def _dispatch(self, todo: list[Shard], address: str | None, show_progress: bool) -> None:
        spec, report = self.spec, self.report
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")  # set inside a submitted Ray job
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # the embedded default: a local Ray on this machine's cores
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        from illada_batch.job.replica import (
            Replica as cls,  # either backend: the replica builds the engine the spec names
        )

        spec_json = spec.model_dump_json()

        threads = str(max(1, int(spec.resources.num_cpus)))
        # as many threads as CPUs; the tokenizer (Rust, rayon) would otherwise take every core of the node
        env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads,
                            "TOKENIZERS_PARALLELISM": "false"}}

        def new_replica():
            return cls.options(num_gpus=spec.resources.num_gpus, num_cpus=spec.resources.num_cpus,
                               max_restarts=spec.max_retries + 1, max_task_retries=0, runtime_env=env).remote(
                spec_json, self.out_url, self.fingerprint)

        replicas = [new_replica() for _ in range(min(spec.replicas, len(todo)))]
        queue: deque[tuple[Shard, int, float]] = deque((s, 0, 0.0) for s in todo)  # (shard, attempt, not before)
        inflight: dict = {}  # ObjectRef -> (replica index, shard, attempt)
        progress = Progress(sum(s.num_rows for s in todo) * spec.n, len(todo), enabled=show_progress)
        drained = False
        try:
            while queue or inflight:
                load = Counter(r for r, _, _ in inflight.values())
                for r in range(len(replicas)):
                    # two shards per replica: the next one is queued at the actor while it works on
                    # this one, so it never waits for the driver between shards
                    while load[r] < 2 and (item := _next_ready(queue)) is not None:
                        shard, attempt = item
                        inflight[replicas[r].process.remote(shard.to_dict())] = (r, shard, attempt)
                        load[r] += 1
                if not inflight:  # only retries waiting out their backoff
                    time.sleep(0.2)
                    continue
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    r, shard, attempt = inflight.pop(ref)
                    try:
                        m = ray.get(ref)
                    except RayTaskError as exc:  # raised inside process(): a bad shard, or a bug
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        retries = 0 if type(cause).__name__ == "ShardError" else spec.max_retries
                        self._retry_or_fail(queue, shard, attempt, f"{type(cause).__name__}: {cause}", retries)
                        continue
                    except RayActorError as exc:  # the replica died (device fault, OOM, preemption)
                        self._retry_or_fail(queue, shard, attempt, f"replica died: {type(exc).__name__}",
                                            spec.max_retries)
                        replicas[r] = _alive_or_new(replicas[r], new_replica)
                        continue
                    report.committed += 1
                    report.samples += m["samples"]
                    report.rows += m["samples"] // spec.n
                    report.errors += m["errors"]
                    report.tokens += m["tokens"]
                    report.gen_seconds += m["gen_seconds"]
                    report.busy.setdefault((m["node"], m["pid"]), []).append(
                        (m["started"], m["committed_at"]))
                    progress.update(m["samples"], m["tokens"], len(report.failed))
            drained = True
        finally:
            progress.close()
            _close(replicas, graceful=drained)

    def _retry_or_fail(self, queue: deque, shard: Shard, attempt: int, error: str, max_retries: int) -> None:
        where = f"shard {shard.shard_id} ({shard.path} rows {shard.row_start}-{shard.row_start + shard.num_rows - 1})"
        if attempt < max_retries:
            wait = min(60.0, self.spec.retry_backoff_s * 2 ** attempt)
            self.log(f"{where}: {error}; retry {attempt + 1}/{max_retries} in {wait:.0f} s")
            queue.append((shard, attempt + 1, time.time() + wait))
        else:
            self.report.failed[shard.shard_id] = error
            self.out.record_failure(shard.shard_id, self.fingerprint, error, attempt + 1)
            self.log(f"{where} failed after {attempt + 1} tries: {error}")

    def _finish(self, n_shards: int) -> None:
        spec, report, out = self.spec, self.report, self.out
        manifests = out.manifests()
        out.clear_failures(list(manifests))
        orphans = out.remove_orphans(manifests)
        report.wall_seconds = time.time() - self.t0
        summary = {
            "job": spec.name, "output": self.out_url, "fingerprint": self.fingerprint, "model": spec.model.path,
            "backend": spec.backend, "sampling": spec.sampling.model_dump(), "n": spec.n, "seed": spec.seed,
            "shards": report.shards, "shards_committed": len(manifests), "shards_failed": len(report.failed),
            "rows": sum(m["samples"] for m in manifests.values()) // spec.n,
            "samples": sum(m["samples"] for m in manifests.values()),
            "errors": sum(m["errors"] for m in manifests.values()),
            "tokens": sum(m["tokens"] for m in manifests.values()),
            "this_run": {"shards": report.committed, "tokens": report.tokens,
                         "wall_seconds": round(report.wall_seconds, 2),
                         "tokens_per_second": round(report.tokens / max(report.wall_seconds, 1e-9), 2),
                         "replica_seconds": round(report.replica_seconds, 2), "orphans_removed": orphans},
            "host": socket.gethostname(), "finished_at": time.time(),
        }
        if not report.failed and len(manifests) == n_shards:
            out.write_success(summary, card(spec, summary))
        self.log(summary_table(report, summary))


def _next_ready(queue: deque) -> tuple[Shard, int] | None:
    """Take the first queued (shard, attempt) whose backoff has passed, or None."""
    now = time.time()
    for i, (shard, attempt, not_before) in enumerate(queue):
        if not_before <= now:
            del queue[i]
            return shard, attempt
    return None


def _heartbeat(out: Output, owner: str, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT_SECONDS):
        try:
            out.heartbeat(owner)
        except Exception:  # noqa: BLE001 - a missed beat is retried; the lock only ages
            pass


def _close(replicas: list, graceful: bool) -> None:
    """End the replicas; when none has work left, first shut each engine down (vLLM's wants
    that before Ray goes away). After an error or an interrupt they are killed at once."""
    if graceful and replicas:
        ray.wait([r.close.remote() for r in replicas], num_returns=len(replicas), timeout=60)
    for replica in replicas:
        ray.kill(replica)


def _alive_or_new(replica, new_replica):
    """Ray restarts a dead replica while it has restarts left; past that, start a new one."""
    try:
        ray.get(replica.__ray_ready__.remote(), timeout=120)
        return replica
    except Exception:  # noqa: BLE001
        return new_replica()


def status(output_url: str, storage_options: dict | None = None) -> dict:
    out = Output(*filesystem(output_url, storage_options or {}))
    manifests, failures, success = out.manifests(), out.failures(), out.success()
    return {"output": output_url, "committed_shards": len(manifests), "failed_shards": failures,
            "samples": sum(m["samples"] for m in manifests.values()),
            "errors": sum(m["errors"] for m in manifests.values()),
            "complete": success is not None, "summary": success,
            "fingerprints": sorted({m["fingerprint"] for m in manifests.values()})}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
