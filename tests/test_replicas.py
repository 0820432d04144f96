"""Replicas the cluster cannot place or start (DESIGN.md, "Failures"): the job never waits in
silence, and an error a retry cannot fix stops it once with the replica's own message.

One local Ray cluster of 2 CPUs for the module; each job runs in a thread with a bound, so
a job that hangs (as these did before the fix) fails its test instead of hanging it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import assert_exactly_once, read_output

from illada_batch.errors import ClusterError, JobStopped
from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict
from illada_batch.model.checkpoint import MODELS_DIR

pytestmark = pytest.mark.slow

GOOD = "Input: lamb king bread\nOutput:"


def job(tmp_path: Path, rows: int = 8, **extra):
    (tmp_path / "in").mkdir(exist_ok=True)
    ids = [f"r{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": [GOOD] * rows}), tmp_path / "in" / "a.parquet")
    spec = {"name": "rep", "model": {"path": "tiny-llada"}, "input": {"url": str(tmp_path / "in")},
            "sampling": {"steps": 4, "gen_length": 8, "block_length": 8},
            "output": {"url": str(tmp_path / "out")}, "shard_rows": 2, "max_retries": 1, "retry_backoff_s": 0,
            **extra}
    return spec_from_dict(spec), ids


def bounded(fn, seconds: float = 90):
    """``fn()``'s result or exception, or a failure if it is still running after ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the job was still running after {seconds} s: it waits in silence"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_a_replica_that_cannot_be_placed_is_reported_and_its_shards_go_elsewhere(ray_cluster, tmp_path):
    """3 replicas of 1 CPU on 2 CPUs: before the fix the third held two shards and the job
    waited forever at 61 of 63."""
    spec, ids = job(tmp_path, rows=80, replicas=3, placement_timeout_s=3)
    logs: list[str] = []
    summary = bounded(lambda: run_job(spec, show_progress=False, log=logs.append))
    assert summary.exit_code() == 0, logs
    # one never had room (a replica whose worker is still starting on a busy machine is told
    # apart by the CPUs in use)
    placed = [m for m in logs if "was not placed within 3 s" in m]
    assert len(placed) == 1, logs
    assert "it asks for 1 CPU; the cluster has 2 CPU in total" in placed[0], placed
    assert placed[0].endswith("; the shards go to the other replicas"), placed
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(tmp_path / "out")), ids, n=1)


def test_a_gpu_replica_on_a_cluster_without_gpus_is_refused_at_once(ray_cluster, tmp_path):
    spec, _ = job(tmp_path, resources={"num_gpus": 1})
    with pytest.raises(ClusterError, match="a replica asks for 1 CPU, 1 GPU, which no node of this cluster has") \
            as info:
        bounded(lambda: run_job(spec, show_progress=False, log=lambda *_: None))
    assert "the cluster has 2 CPU in total" in str(info.value)


def test_no_replica_placed_on_a_cluster_that_may_grow_stops_the_job_and_says_why(ray_cluster, tmp_path):
    """Given an address, the cluster may autoscale: the job waits placement_timeout_s, says
    that nothing commits meanwhile, then stops with what was asked and what is there."""
    spec, _ = job(tmp_path, resources={"num_gpus": 1}, placement_timeout_s=3, stall_warning_s=1)
    logs: list[str] = []
    with pytest.raises(ClusterError) as info:
        bounded(lambda: run_job(spec, address=ray_cluster, show_progress=False, log=logs.append))
    msg = str(info.value)
    assert msg.startswith("no replica is running: replica 1 was not placed within 3 s"), msg
    assert "it asks for 1 CPU, 1 GPU; the cluster has 2 CPU in total" in msg
    assert any(m.startswith("no shard committed in the last") and "being placed or started" in m for m in logs), logs
    record = json.loads((tmp_path / "out" / "_FAILED.json").read_text())
    assert record["status"] == f"FAILED: stopped: {msg}"


def test_a_model_that_fails_its_checksum_stops_the_job_once_with_its_message(ray_cluster, tmp_path):
    """Before the fix: 'replica died: ActorDiedError', once per shard, never naming the model."""
    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-llada", model)
    spec, _ = job(tmp_path, model={"path": str(model), "sha256": "0" * 64})
    logs: list[str] = []
    with pytest.raises(JobStopped) as info:
        bounded(lambda: run_job(spec, show_progress=False, log=logs.append))
    msg = str(info.value)
    assert f"model {model}: weights sha256" in msg and "0" * 64 in msg, msg
    assert not any("retry" in m or "failed after" in m for m in logs), "stopped once, not once per shard"
    record = json.loads((tmp_path / "out" / "_FAILED.json").read_text())
    assert record["stopped"] == msg and record["status"] == f"FAILED: stopped: {msg}"
