"""Node loss (DESIGN.md, "Failures"): a two-node local Ray cluster (``ray.cluster_utils.Cluster``,
its own head and worker, stopped by the test), the worker node killed while its replica
works: its shards are redone on the other node, nothing lost or doubled."""

from __future__ import annotations

import json
import threading
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import assert_exactly_once, local_cluster, read_output

from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow

GOOD = "Input: lamb king bread\nOutput:"


@pytest.fixture(scope="module")
def two_nodes():
    with local_cluster(workers=1, fast_health_checks=True) as (cluster, (worker,)):
        yield cluster, worker


def committed_pids(out) -> set[int]:
    try:
        return {json.loads(p.read_text())["stats"]["pid"] for p in (out / "_manifest").glob("*.json")}
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def test_worker_node_killed_mid_job(two_nodes, tmp_path):
    cluster, worker = two_nodes
    ids = [f"r{i:03d}" for i in range(240)]  # 120 shards: work left when the node dies
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "prompt": [GOOD] * len(ids)}), tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    spec = spec_from_dict({"name": "node", "input": {"url": str(tmp_path / "in")}, "output": {"url": str(out)},
                           "sampling": {"steps": 8, "gen_length": 8, "block_length": 8, "early_stop": False},
                           "replicas": 2, "shard_rows": 2, "max_retries": 2, "retry_backoff_s": 0,
                           "placement_timeout_s": 5})
    killed = []

    def kill_worker_node():  # once both replicas (one per node) have committed: each holds shards
        deadline = time.time() + 120
        while time.time() < deadline and len(committed_pids(out)) < 2:
            time.sleep(0.05)
        killed.append(len(list((out / "_manifest").glob("*.json"))))  # shards committed before the kill
        cluster.remove_node(worker, allow_graceful=False)

    t = threading.Thread(target=kill_worker_node)
    t.start()
    logs: list[str] = []
    summary = run_job(spec, show_progress=False, log=logs.append)
    t.join()
    assert killed, "the worker node was never killed"
    assert killed[0] < 120, f"the node died after the job's work was done ({killed[0]} shards committed)"
    assert summary.exit_code() == 0, logs
    died = [m for m in logs if "replica died" in m]
    assert died and all("retry 1/2" in m for m in died), logs  # each of its shards redone, on the first retry
    # the replacement had no node to go to: the head's replica did the rest
    assert len(committed_pids(out)) == 2
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), ids, n=1)
    assert summary.samples == len(ids) and summary.shards_committed == summary.shards == 120
