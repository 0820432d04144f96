"""The Ray driver: lists shards, skips committed ones, hands shards to replicas that ask
for work, retries what failed, and writes the summary last. It imports no torch.

Design note. Each replica has at most one shard in flight, so a fast replica simply comes
back sooner for the next one (pull-based balancing). A replica that dies mid-shard is
restarted by Ray (``max_restarts``) or replaced; its shard goes back to the queue. A
shard that fails ``max_retries + 1`` times, or whose file is bad, is recorded under
``_failed/`` with its error and the job goes on. Only shard manifests count as done.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError

from .commit import Output
from .progress import Progress, card, summary_table
from .shards import Shard, filesystem, plan_shards
from .spec import JobSpec


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
    replica_seconds: float = 0.0
    already_complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def exit_code(self, error_budget: float) -> int:
        if self.failed:
            return 1
        return 0 if self.errors <= error_budget * max(1, self.samples) else 1


def _replica_class(spec: JobSpec):
    if spec.backend == "vllm":
        from .vllm_replica import VLLMReplica as cls
    else:
        from .replica import Replica as cls
    return cls


def run_job(spec: JobSpec, date: str | None = None, address: str | None = None, show_progress: bool = True,
            log=print) -> JobReport:
    t0 = time.time()
    spec = spec.resolved()
    out_url = spec.output_url(date)
    fingerprint = spec.fingerprint()
    out = Output(*filesystem(out_url, spec.output.storage_options))
    report = JobReport(out_url)
    committed = out.check_fingerprint(fingerprint)
    i = spec.input
    columns = list(dict.fromkeys([i.id_column, i.messages_column or i.prompt_column, *i.variables, *i.passthrough]))
    shards, bad_files = plan_shards(i.url, i.storage_options, spec.shard_rows, columns)
    report.shards = len(shards) + len(bad_files)
    todo = [s for s in shards if s.shard_id not in committed]
    report.skipped = len(shards) - len(todo)
    if not todo and not bad_files and out.success() is not None:
        report.already_complete = True
        report.committed = len(shards)
        log(f"{out_url}: already complete ({len(shards)} shards committed, fingerprint {fingerprint}); nothing to do")
        return report
    for path, error in bad_files:
        sid = f"file:{path.rsplit('/', 1)[-1]}"
        report.failed[sid] = error
        out.record_failure(sid.replace(":", "-"), fingerprint, error, attempts=1)
        log(f"shard failed: {error}")
    if report.skipped:
        log(f"resuming: {report.skipped} of {len(shards)} shards already committed, {len(todo)} to go")

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None else None,
                 **({"num_cpus": os.cpu_count()} if address is None else {}))
    cls = _replica_class(spec)
    spec_json = spec.model_dump_json()

    def new_replica():
        return cls.options(num_gpus=spec.resources.num_gpus, num_cpus=spec.resources.num_cpus,
                           max_restarts=spec.max_retries + 1, max_task_retries=0).remote(spec_json, out_url, fingerprint)

    replicas = [new_replica() for _ in range(min(spec.replicas, max(1, len(todo))))]
    queue: deque[tuple[Shard, int]] = deque((s, 0) for s in todo)
    inflight: dict = {}  # ObjectRef -> (replica index, shard, attempt)
    total = sum(s.num_rows for s in todo) * spec.n
    progress = Progress(total, len(todo), enabled=show_progress)
    try:
        while queue or inflight:
            busy = {r for r, _, _ in inflight.values()}
            for r in range(len(replicas)):
                if r not in busy and queue:
                    shard, attempt = queue.popleft()
                    inflight[replicas[r].process.remote(shard.to_dict())] = (r, shard, attempt)
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in done:
                r, shard, attempt = inflight.pop(ref)
                try:
                    m = ray.get(ref)
                except RayTaskError as exc:  # raised inside process(): a bad shard, or a bug
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    retryable = type(cause).__name__ != "ShardError"
                    _retry_or_fail(out, queue, report, shard, attempt, f"{type(cause).__name__}: {cause}",
                                   spec.max_retries if retryable else 0, fingerprint, log)
                    continue
                except RayActorError as exc:  # the replica died (device fault, OOM, preemption)
                    _retry_or_fail(out, queue, report, shard, attempt, f"replica died: {type(exc).__name__}",
                                   spec.max_retries, fingerprint, log)
                    replicas[r] = _alive_or_new(replicas[r], new_replica)
                    continue
                report.committed += 1
                report.samples += m["samples"]
                report.rows += m["samples"] // spec.n
                report.errors += m["errors"]
                report.tokens += m["tokens"]
                report.gen_seconds += m["gen_seconds"]
                report.replica_seconds += m["seconds"]
                progress.update(m["samples"], m["tokens"], len(report.failed))
    finally:
        progress.close()
    manifests = out.manifests()
    out.clear_failures([sid for sid in manifests])
    orphans = out.remove_orphans(manifests)
    report.wall_seconds = time.time() - t0
    summary = {
        "job": spec.name, "output": out_url, "fingerprint": fingerprint, "model": spec.model.path,
        "backend": spec.backend, "sampling": spec.sampling.model_dump(), "n": spec.n, "seed": spec.seed,
        "shards": report.shards, "shards_committed": len(manifests), "shards_failed": len(report.failed),
        "rows": sum(m["samples"] for m in manifests.values()) // spec.n,
        "samples": sum(m["samples"] for m in manifests.values()),
        "errors": sum(m["errors"] for m in manifests.values()),
        "tokens": sum(m["tokens"] for m in manifests.values()),
        "this_run": {"shards": report.committed, "tokens": report.tokens, "wall_seconds": round(report.wall_seconds, 2),
                     "tokens_per_second": round(report.tokens / max(report.wall_seconds, 1e-9), 2),
                     "replica_seconds": round(report.replica_seconds, 2), "orphans_removed": orphans},
        "host": socket.gethostname(), "finished_at": time.time(),
    }
    if not report.failed and len(manifests) == len(shards):
        out.write_success(summary, card(spec, summary))
    log(summary_table(report, summary))
    return report


def _retry_or_fail(out: Output, queue: deque, report: JobReport, shard: Shard, attempt: int, error: str,
                   max_retries: int, fingerprint: str, log) -> None:
    if attempt < max_retries:
        log(f"shard {shard.shard_id} ({shard.path} rows {shard.row_start}+{shard.num_rows}): {error}; "
            f"retry {attempt + 1}/{max_retries}")
        queue.append((shard, attempt + 1))
    else:
        report.failed[shard.shard_id] = error
        out.record_failure(shard.shard_id, fingerprint, error, attempt + 1)
        log(f"shard {shard.shard_id} failed after {attempt + 1} tries: {error}")


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
