"""Pipeline benchmarks (``illada-batch bench --only pipeline,driver``).

- pipeline efficiency: generated tokens/s of a whole job (local Ray, one replica, input and
  output on an S3-compatible server on 127.0.0.1) over the engine's tokens/s on the same
  rows in one process, measured one after the other in this run;
- driver overhead: a job of many one-row shards with generation length 1, driver CPU
  seconds per shard (time.process_time of the driver process).
Needs the dev extra (moto) for the S3 server.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _moto() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # moto's server with S3's listing complexity (a page in O(page), not a sort of the bucket)
    proc = subprocess.Popen([sys.executable, "-m", "illada_batch.bench.moto_listing", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for k, v in (("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "testing"),
                 ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(k, v)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}"}


def _demo_rows(n: int) -> tuple[str, list[str], list[str]]:
    from illada_batch.model.checkpoint import load_model
    from illada_batch.tasks import suite as tasks

    tok = load_model("tiny-llada").tokenizer
    rng = random.Random(7)
    prefix, state = tasks.make_prefix("reverse", rng, 400, lambda s: len(tok.encode(s)))
    rows = [tasks.make_row("reverse", state, rng)[0] for _ in range(n)]
    return prefix, [f"r{i:05d}" for i in range(n)], rows


def bench_pipeline_efficiency(rows: int = 512) -> dict:
    import s3fs

    from illada_batch.engine.diffusion import Engine
    from illada_batch.engine.requests import Request
    from illada_batch.job.driver import run_job
    from illada_batch.job.spec import spec_from_dict

    prefix, ids, prompts = _demo_rows(rows)
    sampling = {"steps": 32, "gen_length": 32, "block_length": 32, "early_stop": True}
    proc, opts = _moto()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        fs.mkdir("bench")
        with fs.open("bench/in/prompts.parquet", "wb") as f:
            pq.write_table(pa.table({"id": ids, "prompt": prompts}), f, row_group_size=64)
        spec = spec_from_dict({
            "name": "bench", "input": {"url": "s3://bench/in/", "storage_options": opts},
            "prefix": {"text": prefix}, "sampling": sampling, "engine": {"cache": "prefix", "max_batch_size": 16},
            "output": {"url": "s3://bench/out", "storage_options": opts}, "replicas": 1, "shard_rows": 64,
            "resources": {"num_cpus": 1}})
        # the engine alone, in this process, same rows and settings
        import torch

        torch.set_num_threads(1)
        engine = Engine.from_pretrained("tiny-llada", cache="prefix", max_batch_size=16)
        params = spec.sampling.params()
        p_ids = tuple(engine.tokenizer.encode(prefix))
        reqs = [Request(i, tuple(engine.tokenizer.encode(p)), p_ids, params, 0, spec.seed) for i, p in zip(ids, prompts)]
        def engine_alone() -> tuple[float, int]:
            t0 = time.perf_counter()
            results = engine.run(reqs)
            return time.perf_counter() - t0, sum(len(r.token_ids) for r in results)

        # engine, job, engine: the machine is shared and noisy, so the engine's time is the
        # mean of a run before and a run after the job
        before, engine_tokens = engine_alone()
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        report = run_job(spec, show_progress=False, log=lambda *_: None)
        ray.shutdown()
        after, _ = engine_alone()
        engine_s = (before + after) / 2
    finally:
        proc.terminate()
    engine_tps = engine_tokens / engine_s
    job_tps = report.this_run.tokens / report.this_run.wall_seconds
    return {"rows": rows, "engine_tokens_per_s": engine_tps, "job_tokens_per_s": job_tps,
            "job_wall_s": report.this_run.wall_seconds, "engine_s": engine_s, "efficiency": job_tps / engine_tps,
            # where the rest goes: the replica's engine against the engine alone (tokens over the time
            # inside engine.run), and the share of the job's wall time the replica spent generating
            "engine_in_replica": (report.this_run.tokens / report.this_run.gen_seconds) / engine_tps,
            "generating_share": report.this_run.gen_seconds / report.this_run.wall_seconds,
            "same_token_count": report.this_run.tokens == engine_tokens}


def bench_driver_overhead(shards: int = 2000, replicas: int = 2) -> dict:
    import ray

    from illada_batch.job.driver import run_job
    from illada_batch.job.spec import spec_from_dict

    tmp = Path(tempfile.mkdtemp(prefix="illada-driver-"))
    try:
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(shards)], "prompt": ["Input: lamb\nOutput:"] * shards}),
                       tmp / "in.parquet", row_group_size=1000)
        spec = spec_from_dict({
            "name": "driver", "input": {"url": str(tmp / "in.parquet")},
            "sampling": {"steps": 1, "gen_length": 1, "block_length": 1, "early_stop": False},
            "engine": {"cache": "off", "max_batch_size": 1}, "output": {"url": str(tmp / "out")},
            "replicas": replicas, "shard_rows": 1, "resources": {"num_cpus": 1}})
        ray.init(address="local", num_cpus=replicas, include_dashboard=False, log_to_driver=False)
        cpu0, t0 = time.process_time(), time.perf_counter()
        report = run_job(spec, show_progress=False, log=lambda *_: None)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shards": report.this_run.shards, "driver_cpu_s": cpu, "wall_s": wall,
            "driver_ms_per_shard": 1000 * cpu / max(report.this_run.shards, 1),
            "wall_ms_per_shard": 1000 * wall / max(report.this_run.shards, 1)}
