"""``illada-batch bench --only scale``: the real driver at 10^3..10^5 shards.

The driver runs in a child process against simulated replicas (``sim_replica.py``: they
commit each shard at once with the real ``Output.write_shard``) on a local Ray, with input
and output on an S3-compatible server on 127.0.0.1, a bucket per size, or in local files
(``store="local"``: the same code, without the server's 30-40 commits a second; there the
manifest index is not used, a local listing having no content hash). The server is moto with
S3's listing complexity (``moto_listing.py``: moto's own answers, each page in O(page) as on
S3; moto itself sorts the whole bucket for every page of 1,000). For each size it measures:

- plan: listing the input and reading its footers (``plan_shards``), and the duplicate-id
  pass (``mark_duplicate_ids``), in this process;
- a run crashed at half the shards (a replica SIGKILLs the driver), then ``status`` on the
  interrupted output (it reads every manifest);
- the resume: seconds until the first shard is handed out, its wall time, its driver CPU per
  shard it committed, the driver's peak memory (ru_maxrss) and its growth over the memory it
  had before ``run_job``;
- ``status`` on the finished output.
Growth per shard between sizes is (peak at the larger - peak at the smaller) / (shards
difference). The resume's driver CPU is also given by thread (its own, fsspec's event loop
where S3 responses are parsed, Ray's), with its S3 requests by operation. Prints a table and
writes JSON. ``ILLADA_SCALE_PROFILE=1`` (or ``cpu``): each driver's cProfiles and tracemalloc
diff beside its log (``_Profile``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARDS_PER_FILE = 1000


def _spec_dict(base: str, n_shards: int, rows_per_shard: int, replicas: int, opts: dict) -> dict:
    return {"name": f"scale-{n_shards}", "model": {"path": "tiny-llada"},
            "input": {"url": f"{base}/in/", "storage_options": opts, "passthrough": []},
            "sampling": {"steps": 1, "gen_length": 1, "block_length": 1},
            "output": {"url": f"{base}/out", "storage_options": opts},
            "replicas": replicas, "shard_rows": rows_per_shard, "resources": {"num_cpus": 0},
            "stall_warning_s": 3600}


def _write_input(fs, folder: str, n_shards: int, rows_per_shard: int) -> int:
    rows, start = 0, 0
    fs.makedirs(folder, exist_ok=True)
    while start < n_shards:
        k = min(SHARDS_PER_FILE, n_shards - start)
        n = k * rows_per_shard
        table = pa.table({"id": [f"r{rows + i}" for i in range(n)], "prompt": ["Input: lamb\nOutput:"] * n})
        with fs.open(f"{folder}/part-{start // SHARDS_PER_FILE:05d}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=max(1, min(n, 10_000)))
        rows, start = rows + n, start + k
    return rows


def _driver(spec: dict, gcs: str, tmp: Path, tag: str, crash_at: int | None) -> dict:
    """Run the driver in a child process; its measurements, or {} when it was killed."""
    args = {"spec": spec, "gcs": gcs, "counter": str(tmp / f"{tag}.count"), "crash_at": crash_at,
            "first_call": str(tmp / f"{tag}.first"), "result": str(tmp / f"{tag}.json"),
            "profile": str(tmp / tag) if os.environ.get("ILLADA_SCALE_PROFILE") else None}
    t0 = time.time()
    with open(tmp / f"{tag}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "illada_batch.bench.scale", json.dumps(args)], stdout=log,
                              stderr=subprocess.STDOUT)
    out = {"returncode": proc.returncode, "wall_s": time.time() - t0}
    if Path(args["result"]).exists():
        out.update(json.loads(Path(args["result"]).read_text()))
    if Path(args["first_call"]).exists() and "t_start" in out:
        out["to_first_shard_s"] = float(Path(args["first_call"]).read_text().split()[0]) - out["t_start"]
    return out


def _child(args: dict) -> None:
    """The driver process: join the benchmark's Ray, run the job with simulated replicas."""
    import ray

    from illada_batch.bench.sim_replica import sim_replica
    from illada_batch.job.driver import run_job
    from illada_batch.job.spec import spec_from_dict

    ray.init(address=args["gcs"], log_to_driver=False)
    spec = spec_from_dict(args["spec"])
    replica = sim_replica(args["counter"], args["crash_at"], os.getpid(), args["first_call"])
    requests = _count_requests(spec)
    rss0, threads0 = _rss_kb(), _thread_cpu()
    profiler = _Profile(args["profile"]) if args.get("profile") else None
    t0, cpu0 = time.time(), time.process_time()
    summary = run_job(spec, show_progress=False, log=lambda *a: print(*a, flush=True), replica=replica)
    cpu, wall = time.process_time() - cpu0, time.time() - t0
    if profiler is not None:
        profiler.stop()
    Path(args["result"]).write_text(json.dumps({
        "t_start": t0, "run_s": wall, "driver_cpu_s": cpu, "shards_this_run": summary.this_run.shards,
        "skipped": summary.this_run.skipped, "status": summary.verdict(), "rss_before_kb": rss0,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "s3_requests": dict(requests),
        "cpu_by_thread_s": {
            name: round(t - threads0.get(name, 0.0), 2) for name, t in sorted(_thread_cpu().items())}}))


class _Profile:
    """``ILLADA_SCALE_PROFILE=1``: the driver's cProfile in CPU time of its main thread
    (``<tag>.prof``) and of fsspec's event loop, where its S3 requests are made and parsed
    (``<tag>.io.prof``), and its Python allocations still held after ``run_job`` against those
    before, by line (``<tag>.mem.txt``: tracemalloc, which slows the driver: its CPU figures
    are not kept). ``ILLADA_SCALE_PROFILE=cpu``: the profiles without tracemalloc."""

    def __init__(self, path: str) -> None:
        import cProfile
        import tracemalloc

        from fsspec.asyn import get_loop

        self.path, self.mem = path, os.environ.get("ILLADA_SCALE_PROFILE") != "cpu"
        if self.mem:
            tracemalloc.start(4)
            self.before = tracemalloc.take_snapshot()
        self.prof, self.io = cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)
        self.loop = get_loop()
        self.loop.call_soon_threadsafe(self.io.enable)  # a profiler covers the thread that enables it
        self.prof.enable()

    def stop(self) -> None:
        import asyncio
        import tracemalloc

        self.prof.disable()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.io.disable)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result()
        self.prof.dump_stats(f"{self.path}.prof")
        self.io.dump_stats(f"{self.path}.io.prof")
        if self.mem:
            peak = tracemalloc.get_traced_memory()[1]
            diff = tracemalloc.take_snapshot().compare_to(self.before, "lineno")
            Path(f"{self.path}.mem.txt").write_text(f"peak traced {peak / 1e6:.1f} MB\n" +
                                                     "\n".join(str(d) for d in diff[:40]))


def _count_requests(spec):
    """The driver's S3 requests by operation (a Counter filled as it runs; empty on local files):
    counted on the s3fs instance the driver's ``filesystem`` calls get (fsspec caches it)."""
    from collections import Counter

    from illada_batch.job.storage import filesystem

    counts, (fs, _) = Counter(), filesystem(spec.output.url, spec.output.storage_options)
    call = getattr(fs, "_call_s3", None)
    if call is not None:
        async def counted(method, *args, **kwargs):
            counts[method] += 1
            return await call(method, *args, **kwargs)
        fs._call_s3 = counted
    return counts


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, summed by thread name: the
    driver's (``MainThread``), fsspec's event loop (``fsspecIO``), Ray's own threads (a thread
    that ended is left out)."""
    import threading

    tick, out = os.sysconf("SC_CLK_TCK"), {}
    python = {str(t.native_id): t.name for t in threading.enumerate()}  # the OS knows them all as python3
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = python.get(tid) or f.read().strip()
        except FileNotFoundError:  # the thread ended
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def bench_scale(n_shards: int, store: "_Store", gcs: str, tmp: Path, rows_per_shard: int = 4,
                replicas: int = 8) -> dict:
    from illada_batch.job.driver import status
    from illada_batch.job.idcheck import mark_duplicate_ids_bounded as mark_duplicate_ids
    from illada_batch.job.shards import plan_shards

    base = store.base(n_shards)
    spec = _spec_dict(base, n_shards, rows_per_shard, replicas, store.opts)
    rows = _write_input(store.fs, store.path(base) + "/in", n_shards, rows_per_shard)
    t0 = time.perf_counter()
    shards, _ = plan_shards(spec["input"]["url"], store.opts, rows_per_shard, ["id", "prompt"], "id", "prompt")
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mark_duplicate_ids(spec["input"]["url"], store.opts, shards, "id")
    dup_s = time.perf_counter() - t0
    del shards
    crashed = _driver(spec, gcs, tmp, f"crash-{n_shards}", crash_at=n_shards // 2)
    t0 = time.perf_counter()
    half = status(spec["output"]["url"], store.opts)
    status_half_s = time.perf_counter() - t0
    resumed = _driver(spec, gcs, tmp, f"resume-{n_shards}", crash_at=None)
    t0 = time.perf_counter()
    final = status(spec["output"]["url"], store.opts)
    status_s = time.perf_counter() - t0
    done = resumed.get("shards_this_run", 0)
    return {
        "store": store.name, "shards": n_shards, "rows": rows, "plan_s": plan_s, "duplicate_id_pass_s": dup_s,
        "crashed_run_s": crashed["wall_s"], "crashed_returncode": crashed["returncode"],
        "committed_before_crash": half.shards_committed, "status_interrupted_s": status_half_s,
        "resume_to_first_shard_s": resumed.get("to_first_shard_s"), "resume_run_s": resumed.get("run_s"),
        "resume_shards": done, "driver_cpu_s": resumed.get("driver_cpu_s"), "driver_cpu_ms_per_shard": 1000 * resumed.get("driver_cpu_s", 0) / max(done, 1),
        "driver_peak_rss_mb": resumed.get("peak_rss_kb", 0) / 1024,
        "driver_growth_mb": (resumed.get("peak_rss_kb", 0) - resumed.get("rss_before_kb", 0)) / 1024,
        "status_finished_s": status_s, "final_status": final.verdict(),
        "driver_cpu_by_thread_s": resumed.get("cpu_by_thread_s"), "driver_s3_requests": resumed.get("s3_requests"),
        "complete": final.shards_committed == n_shards and final.samples == rows}


COLUMNS = [("store", "{}"), ("shards", "{:,}"), ("plan_s", "{:.1f}"), ("duplicate_id_pass_s", "{:.1f}"), ("status_interrupted_s", "{:.1f}"),
           ("resume_to_first_shard_s", "{:.1f}"), ("resume_run_s", "{:.1f}"), ("driver_cpu_ms_per_shard", "{:.2f}"),
           ("driver_peak_rss_mb", "{:.0f}"), ("driver_growth_mb", "{:.1f}"), ("status_finished_s", "{:.2f}"),
           ("complete", "{}")]


def table(results: list[dict]) -> str:
    head = " | ".join(c for c, _ in COLUMNS)
    lines = [f"| {head} |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join("-" if r.get(c) is None else f.format(r[c]) for c, f in COLUMNS) + " |")
    return "\n".join(lines)


def growth_per_shard(results: list[dict]) -> list[dict]:
    """Between consecutive sizes: the driver's peak memory growth per shard (KB) and its CPU
    per shard (ms) at the margin, so that fixed costs (imports, starting replicas) cancel."""
    out = []
    for a, b in zip(results, results[1:]):
        kb = 1024 * (b["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]) / max(b["shards"] - a["shards"], 1)
        ms = 1000 * (b["driver_cpu_s"] - a["driver_cpu_s"]) / max(b["resume_shards"] - a["resume_shards"], 1)
        out.append({"from": a["shards"], "to": b["shards"], "kb_per_shard": kb, "marginal_cpu_ms_per_shard": ms})
    return out


class _Store:
    """Where a size's input and output live: a bucket of its own on the S3 server (moto lists a
    bucket by walking every key in it), or a local folder."""

    def __init__(self, name: str, fs, opts: dict, root: Path) -> None:
        self.name, self.fs, self.opts, self.root = name, fs, opts, root

    def base(self, n_shards: int) -> str:
        if self.name == "s3":
            self.fs.mkdir(f"scale-{n_shards}")
            return f"s3://scale-{n_shards}"
        return str(self.root / f"scale-{n_shards}")

    def path(self, base: str) -> str:
        return base.removeprefix("s3://")


def _sizes(sizes: list[int], rows_per_shard: int, replicas: int, store: str = "s3") -> tuple[list[dict], str]:
    """``bench_scale`` at each size, on one local Ray and one S3 server (or local files); (results, logs folder)."""
    import fsspec
    import ray
    import s3fs

    from illada_batch.bench.pipeline import _moto

    tmp = Path(tempfile.mkdtemp(prefix="illada-scale-"))
    proc, opts = _moto() if store == "s3" else (None, {})
    results = []
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts) if proc else fsspec.filesystem("file")
        where = _Store(store, fs, opts, tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        gcs = ray.get_runtime_context().gcs_address
        for n in sizes:
            results.append(bench_scale(n, where, gcs, tmp, rows_per_shard, replicas))
            print(table(results[-1:]), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if proc:
            proc.terminate()
    return results, str(tmp)


def main(sizes: list[int], out_path: str = "bench-scale.json", rows_per_shard: int = 4, replicas: int = 8,
         ids: list[int] = (), store: str = "s3") -> int:
    from illada_batch.bench.idcheck_mem import bench_idcheck

    id_checks = [r for n in ids for r in bench_idcheck(n)]
    results, logs = _sizes(sizes, rows_per_shard, replicas, store) if sizes else ([], None)
    report = {"store": store, "rows_per_shard": rows_per_shard, "replicas": replicas, "sizes": results, "id_checks": id_checks,
              "growth": growth_per_shard(results), "logs": logs}
    if results:
        print(table(results))
    for g in report["growth"]:
        print(f"{g['from']:,} -> {g['to']:,} shards: driver peak memory growth {g['kb_per_shard']:.2f} KB/shard, "
              f"driver CPU {g['marginal_cpu_ms_per_shard']:.2f} ms/shard at the margin")
    for r in results:
        top = sorted((r.get("driver_cpu_by_thread_s") or {}).items(), key=lambda kv: -kv[1])[:6]
        print(f"{r['shards']:,} shards: the resume's driver CPU by thread: " +
              ", ".join(f"{name} {s:.1f} s" for name, s in top))
        if r.get("driver_s3_requests"):
            print(f"{r['shards']:,} shards: the resume's driver S3 requests: " +
                  ", ".join(f"{op} {n:,}" for op, n in sorted(r["driver_s3_requests"].items())))
    for r in id_checks:
        print(f"duplicate-id check ({r['check']}) of {r['ids']:,} ids: {r['seconds']:.1f} s, peak memory "
              f"{r['peak_rss_mb']:.0f} MB, {r['repeats']:,} repeats")
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
