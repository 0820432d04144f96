"""The Ray driver: plans shards, skips committed ones, hands shards to replicas that ask for
work, retries what failed, and writes the summary last. It imports no torch.

Design note. Each started replica has at most two shards in flight (one running, one
waiting at the actor), so a fast replica simply comes back sooner for more (pull-based
balancing); replicas not yet placed or started get none (``pool.py``). A replica that dies
mid-shard is replaced; its shard goes back to the queue. A shard that fails waits
``retry_backoff_s`` (doubling each try) before its retry; one that fails ``max_retries + 1``
times, or whose file is bad, is recorded under ``_failed/`` with its error and the job goes
on. Only shard manifests count as done, and only those whose fingerprint and row range
match this run's plan (``Output.trusted_manifests``). The summary, and so the exit code, is
computed from the output alone (``records.JobSummary``).
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

import ray
from ray.exceptions import RayActorError, RayTaskError

from illada_batch.errors import ClusterError, FingerprintMismatch, JobStopped, LockHeld, OutputError, SpecError
from illada_batch.job.commit import LOCK_HEARTBEAT_SECONDS, Output
from illada_batch.job.figures import card_figures
from illada_batch.job.idcheck import mark_duplicate_ids_bounded
from illada_batch.job.manifest_index import IndexWriter
from illada_batch.job.metrics import DriverMetrics
from illada_batch.job.placements import Placements
from illada_batch.job.pool import FATAL, ReplicaPool, cause_of, check_fits, death_reason
from illada_batch.job.preflight import cache_text, foreign_refusal, model_problems, output_problems
from illada_batch.job.progress import Progress, card, summary_table
from illada_batch.job.records import JobSummary, Manifest, RunStats
from illada_batch.job.shards import Shard, plan_shards
from illada_batch.job.spec import JobSpec
from illada_batch.job.storage import filesystem, storage_errors


def run_job(spec: JobSpec, date: str | None = None, address: str | None = None, show_progress: bool = True,
            log=print, replica=None) -> JobSummary:
    """Run (or resume) a job; returns its summary (``exit_code()`` is the CLI's). Raises
    FingerprintMismatch (or RowRangeMismatch) or LockHeld before writing anything when the
    output belongs to another job or another run; ClusterError or JobStopped when the
    replicas cannot be placed or started. ``replica``: the actor class to start in place of
    ``job.replica.Replica`` (the scale benchmark's simulated replicas)."""
    return _Job(spec.resolved(), date, log, replica).run(address, show_progress)


class _Job:
    def __init__(self, spec: JobSpec, date: str | None, log, replica=None) -> None:
        self.spec, self.log, self.t0, self.replica = spec, log, time.time(), replica
        self.out_url = spec.output_url(date)
        self.fingerprint = spec.fingerprint()
        self.out = Output(*filesystem(self.out_url, spec.output.storage_options))
        self.index = IndexWriter(self.out)  # the manifests this run received, compacted for the next reader
        self.metrics = DriverMetrics(spec.name)  # counts kept until Ray is up (``attach`` in ``_dispatch``)
        self.run_stats = RunStats()
        self.failed: dict[str, str] = {}  # shard id -> error, this run
        self.busy: dict = {}  # (node, pid) -> [(started, committed_at)] of its shards
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def run(self, address: str | None, show_progress: bool) -> JobSummary:
        spec, out = self.spec, self.out
        problems, notes = model_problems(spec, replicas_here=not (address or os.environ.get("RAY_ADDRESS")))
        for note in notes:
            self.log(note)
        if problems:
            raise SpecError("; ".join(problems))
        problems = output_problems(self.out_url, spec.output.storage_options)
        if problems:
            raise OutputError("; ".join(problems))
        with storage_errors(f"output.url {self.out_url}", OutputError, "cannot read"):
            manifests, unreadable, foreign = out.read_at_start()
        if foreign:
            raise OutputError(foreign_refusal(self.out_url, foreign))
        i = spec.input
        shards, bad_files = plan_shards(i.url, i.storage_options, spec.shard_rows, i.columns(), i.id_column,
                                        i.text_column(), note=self.log, exclude=self._output_inside_input())
        plan = {s.shard_id: s.row_range() for s in shards}
        with storage_errors(f"output.url {self.out_url}", OutputError, "cannot read", keep=(FingerprintMismatch,)):
            committed, redo = out.resume_state(self.fingerprint, plan, spec.n, manifests, unreadable)
            previous = out.summary()
        for sid, why in sorted(redo.items()):
            self.log(f"shard {sid} is not committed: {why}; it is generated again")
        del plan, redo  # what the driver holds through the run is the plan's shards, nothing per manifest
        todo = [s for s in shards if s.shard_id not in committed]
        if (not todo and not bad_files and previous is not None and previous.fingerprint == self.fingerprint
                and previous.error_budget == spec.error_budget and previous.complete):
            previous.this_run = RunStats(skipped=len(shards))
            self.log(f"{self.out_url}: nothing to do, every shard is already committed ({len(shards)} shards, "
                     f"fingerprint {self.fingerprint})")
            self.log(summary_table(previous))
            return previous
        if i.check_duplicate_ids and todo:  # only when there is work: it reads a column of every file
            shards, unreadable_ids = mark_duplicate_ids_bounded(i.url, i.storage_options, shards, i.id_column,
                                                                committed=committed)
            bad_files += unreadable_ids
            todo = [s for s in shards if s.shard_id not in committed]
            repeats = sum(len(s.duplicates) for s in todo)
            if repeats:
                self.log(f"input: {repeats:,} row(s) repeat the id of an earlier row; they are written as error rows")
        self.run_stats.skipped = len(shards) - len(todo)
        with storage_errors(f"output.url {self.out_url}", OutputError, "cannot write", keep=(LockHeld,)):
            out.acquire_lock(self.owner)  # LockHeld: another run is writing this output; nothing was touched
            # what the last run left unindexed (it crashed before writing a segment), indexed now
            self.index.add_all([m for m in out.unindexed if m.shard_id in committed])
        out.unindexed, n_shards = [], len(shards)
        del manifests, unreadable, committed, shards
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(out, self.owner, stop), daemon=True)
        beat.start()
        try:
            for path, error in bad_files:
                sid = f"file-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{path.rsplit('/', 1)[-1]}"
                self.failed[sid] = error
                self.metrics.inc("illada_shards_failed", 1)
                out.record_failure(sid, self.fingerprint, error, attempts=1)
                self.log(f"shard failed: {error}")
            if self.run_stats.skipped:
                self.log(f"resuming: {self.run_stats.skipped} of {n_shards} shards already committed, "
                         f"{len(todo)} to go")
            try:
                if todo:
                    self._dispatch(todo, address, show_progress)
            except (JobStopped, ClusterError) as exc:  # recorded in _FAILED.json, then the one-line error
                self._finish(n_shards + len(bad_files), stopped=str(exc))
                raise
            return self._finish(n_shards + len(bad_files))
        finally:
            stop.set()
            beat.join()
            try:
                out.release_lock(self.owner)
            except OutputError as exc:
                self.log(f"{exc}: _LOCK.json is left behind (a next run takes it over once this process is gone)")

    def _output_inside_input(self) -> str | None:
        """The output's path when it shares the input's filesystem (then it is never input)."""
        in_fs, _ = filesystem(self.spec.input.url, self.spec.input.storage_options)
        return self.out.root if type(in_fs) is type(self.out.fs) else None

    def _dispatch(self, todo: list[Shard], address: str | None, show_progress: bool) -> None:
        spec = self.spec
        can_grow = _connect(address)
        self.metrics.attach()
        if self.replica is not None:
            Replica = self.replica
        else:
            from illada_batch.job.replica import Replica  # either backend: the replica builds the engine the spec names

        ranks = spec.engine.tensor_parallel_size  # a replica is N ranks on one node, each with `resources`
        request = {"CPU": spec.resources.num_cpus * ranks, "GPU": spec.resources.num_gpus * ranks}
        if not can_grow:
            check_fits(request)
        spec_json = spec.model_dump_json()
        threads = str(max(1, int(spec.resources.num_cpus)))
        # as many threads as CPUs; the tokenizer (Rust, rayon) would otherwise take every core of the node
        env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads,
                            "TOKENIZERS_PARALLELISM": "false"}}

        placed = Placements(ranks, spec.resources.num_cpus, spec.resources.num_gpus)  # a group per replica

        def new_replica():
            return placed.start(lambda **where: Replica.options(
                num_gpus=spec.resources.num_gpus, num_cpus=spec.resources.num_cpus, max_restarts=0,
                max_task_retries=0, runtime_env=env, **where).remote(spec_json, self.out_url, self.fingerprint))

        lo, hi = spec.replica_range
        pool = ReplicaPool(new_replica, min(hi, len(todo)), request, spec.placement_timeout_s,
                           spec.max_retries + 1, self.log, end=placed.end, reserved=placed.reserved, needed=lo,
                           can_grow=can_grow)
        queue: deque[tuple[Shard, int, float]] = deque((s, 0, 0.0) for s in todo)  # (shard, attempt, not before)
        inflight: dict = {}  # ObjectRef -> (replica index, shard, attempt)
        progress = Progress(sum(s.num_rows for s in todo) * spec.n, len(todo), enabled=show_progress)
        last_commit, last_gauges, drained = time.time(), 0.0, False
        try:
            while queue or inflight:
                pool.poll()
                load = Counter(r for r, _, _ in inflight.values())
                for r in pool.up():
                    # two shards per replica: the next one is queued at the actor while it works on
                    # this one, so it never waits for the driver between shards
                    while load[r] < 2 and (item := _next_ready(queue)) is not None:
                        shard, attempt = item
                        inflight[pool.handle(r).process.remote(shard.to_dict())] = (r, shard, attempt)
                        load[r] += 1
                if not queue and lo < hi:  # a range: replicas with no shard left stop, so the cluster may shrink
                    pool.retire_idle({r for r, _, _ in inflight.values()})
                if time.time() - last_gauges >= 1.0:
                    last_gauges = time.time()
                    self.metrics.flush()  # the counts of the shards committed since the last second
                    self.metrics.replicas(len(pool.slots), pool.placed(), len({r for r, _, _ in inflight.values()}),
                                          progress.tokens / max(time.time() - progress.t0, 1e-9))
                if time.time() - last_commit > spec.stall_warning_s:
                    self.log(f"no shard committed in the last {time.time() - last_commit:.0f} s: "
                             f"{len(pool.up())} replica(s) working, {pool.starting()} being placed or started, "
                             f"{len(inflight)} shard(s) in flight, {len(queue)} queued")
                    last_commit = time.time()
                if not inflight:  # replicas still starting, or retries waiting out their backoff
                    time.sleep(0.2)
                    continue
                # one finished call a turn (one ray.wait, one ray.get): a zero-timeout wait for all
                # that were ready first mostly found none, and cost a second wait a shard
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    r, shard, attempt = inflight.pop(ref)
                    m = self._result(ref, r, shard, attempt, queue, pool)
                    if m is not None:
                        last_commit = time.time()
                        progress.update(m.stats.samples, m.stats.tokens, len(self.failed))
            drained = True
        finally:
            self.metrics.flush()
            progress.close()
            pool.close(graceful=drained)

    def _result(self, ref, r: int, shard: Shard, attempt: int, queue: deque,
                pool: ReplicaPool) -> Manifest | None:
        """The manifest a shard's finished call returned, or None after scheduling its retry or
        recording its failure."""
        try:
            m = ray.get(ref)
        except RayTaskError as exc:  # raised inside process(): a bad shard, or a bug
            cause = cause_of(exc)
            if isinstance(cause, (*FATAL, OutputError)):  # the same on every try: stop once
                raise JobStopped(f"a replica stopped the job: {cause}") from None
            retries = 0 if type(cause).__name__ == "ShardError" else self.spec.max_retries
            self._retry_or_fail(queue, shard, attempt, f"{type(cause).__name__}: {cause}", retries)
            return None
        except RayActorError as exc:  # the replica died (device fault, OOM, preemption, node lost)
            self._retry_or_fail(queue, shard, attempt, f"replica died: {death_reason(exc)}", self.spec.max_retries)
            if r in pool.up():
                pool.replace(r)
            return None
        self.index.add(m)
        self.metrics.committed(m.stats, m.rows.num_rows if m.rows else m.samples // self.spec.n)
        self.run_stats.shards += 1
        self.run_stats.tokens += m.stats.tokens
        self.run_stats.gen_seconds += m.stats.gen_seconds
        self.busy.setdefault((m.stats.node, m.stats.pid), []).append((m.stats.started, m.committed_at))
        return m

    def _retry_or_fail(self, queue: deque, shard: Shard, attempt: int, error: str, max_retries: int) -> None:
        where = f"shard {shard.shard_id} ({shard.row_range().describe()})"
        if attempt < max_retries:
            wait = min(60.0, self.spec.retry_backoff_s * 2 ** attempt)
            self.log(f"{where}: {error}; retry {attempt + 1}/{max_retries} in {wait:.0f} s")
            queue.append((shard, attempt + 1, time.time() + wait))
            self.metrics.inc("illada_shards_retried", 1)
        else:
            self.failed[shard.shard_id] = error
            self.metrics.inc("illada_shards_failed", 1)
            self.out.record_failure(shard.shard_id, self.fingerprint, error, attempt + 1)
            self.log(f"{where} failed after {attempt + 1} tries: {error}")

    def _finish(self, n_shards: int, stopped: str | None = None) -> JobSummary:
        """The summary, from the output; written there unless the output refuses writes
        (then, when the job was stopped, the caller raises its one line)."""
        try:
            return self._summarise(n_shards, stopped)
        except OutputError as exc:
            if stopped is None:
                raise
            self.log(f"{exc}: the summary was not written")
            return JobSummary(output=self.out_url, job=self.spec.name, stopped=stopped)

    def _summarise(self, n_shards: int, stopped: str | None) -> JobSummary:
        spec, out, run = self.spec, self.out, self.run_stats
        self.index.flush()
        manifests, unreadable = out.read_manifests()
        run.orphans_removed = out.remove_orphans(manifests)
        bad = out.untrusted(manifests, unreadable)
        manifests = {sid: m for sid, m in manifests.items() if sid not in bad}
        out.clear_failures(keep=self.failed)
        run.wall_seconds = time.time() - self.t0
        run.replica_seconds = _busy_seconds(self.busy)
        summary = JobSummary(
            output=self.out_url, job=spec.name, fingerprint=self.fingerprint, model=spec.model.path,
            backend=spec.backend, sampling=spec.sampling.model_dump(), cache=cache_text(spec), n=spec.n,
            seed=spec.seed, error_budget=spec.error_budget, shards=n_shards, shards_committed=len(manifests),
            failed={**bad, **self.failed},
            stopped=stopped, samples=sum(m.samples for m in manifests.values()),
            errors=sum(m.stats.errors for m in manifests.values()),
            tokens=sum(m.stats.tokens for m in manifests.values()), this_run=run, host=socket.gethostname(),
            finished_at=time.time())
        text = None
        if summary.complete:
            figures = card_figures(out.fs, out.root, sorted(manifests.values(), key=lambda m: m.shard_id))
            text = card(spec, summary, out.write_figures(figures))
        out.write_summary(summary, text)
        self.log(summary_table(summary))
        return summary


def _connect(address: str | None) -> bool:
    """Join (or start) Ray; True when the cluster may grow (one given by address may autoscale)."""
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a submitted Ray job
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # the embedded default: a local Ray on this machine's cores
            # address="local": a new Ray even where `ray start` left a cluster that a bare init would join
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return bool(address)


def _busy_seconds(busy: dict) -> float:
    """Seconds each replica spent on shards, summed over replicas; a replica works on two
    shards at once, so its time is the union of its shards' intervals."""
    total = 0.0
    for spans in busy.values():
        end = float("-inf")
        for a, b in sorted(spans):
            total += max(0.0, b - max(a, end))
            end = max(end, b)
    return total


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


def status(output_url: str, storage_options: dict | None = None) -> JobSummary:
    """What an output holds: the summary its last finished run wrote, or (while a run is
    going, or after one was interrupted) what its manifests and failure records say."""
    out = Output(*filesystem(output_url, storage_options or {}))
    with storage_errors(f"output {output_url}", OutputError, "cannot read"):
        summary = out.summary()
        manifests, unreadable = out.read_manifests()
        bad = out.untrusted(manifests, unreadable)  # a lost or damaged data file: that shard is not committed
        failures = {} if summary is not None else out.failures()
    if summary is not None and not bad:
        return summary
    manifests = {sid: m for sid, m in manifests.items() if sid not in bad}
    if summary is None:
        fingerprints = sorted({m.fingerprint for m in manifests.values()})
        summary = JobSummary(output=output_url, fingerprint=", ".join(fingerprints) or None,
                             failed={sid: rec.get("error", "?") for sid, rec in failures.items()})
    summary.failed = {**summary.failed, **bad}
    summary.shards_committed = len(manifests)
    summary.samples = sum(m.samples for m in manifests.values())
    summary.errors = sum(m.stats.errors for m in manifests.values())
    summary.tokens = sum(m.stats.tokens for m in manifests.values())
    return summary


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
