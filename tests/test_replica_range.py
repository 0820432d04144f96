"""Replicas as a range (``replicas: {min, max}``) on a cluster that grows: a two-node local
Ray cluster (``ray.cluster_utils.Cluster``) that starts with room for one replica; the
driver asks for two; the second waits as demand past ``placement_timeout_s`` (a fixed
``replicas: 2`` would give it up) and starts on the node added mid-job. Every row exactly
once, and both replicas committed shards."""

from __future__ import annotations

import json
import re
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import assert_exactly_once, local_cluster, read_output

from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow
GOOD = "Input: lamb king bread\nOutput:"


@pytest.fixture(scope="module")
def growing_cluster():
    with local_cluster() as (cluster, _):
        yield cluster


def _pids(out) -> set[int]:
    try:
        return {json.loads(p.read_text())["stats"]["pid"] for p in (out / "_manifest").glob("*.json")}
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def test_a_node_added_mid_job_gets_the_replicas_waiting_for_it(growing_cluster, tmp_path):
    import fsspec

    cluster = growing_cluster
    ids = [f"r{i:03d}" for i in range(320)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "prompt": [GOOD] * len(ids)}), tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    spec = spec_from_dict({"name": "grow", "input": {"url": str(tmp_path / "in")}, "output": {"url": str(out)},
                           "sampling": {"steps": 32, "gen_length": 32, "block_length": 32, "early_stop": False},
                           "replicas": {"min": 1, "max": 2}, "shard_rows": 2, "placement_timeout_s": 2})
    logs: list[str] = []
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(
        spec, address=cluster.address, show_progress=False, log=logs.append)))
    job.start()  # the driver in a thread: Ray adds a node from the main thread only
    deadline = time.time() + 120
    while time.time() < deadline and not _pids(out):  # the first replica works
        time.sleep(0.1)
    time.sleep(4)  # well past the placement timeout
    added = len(list((out / "_manifest").glob("*.json")))
    cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    job.join()
    summary = result["summary"]
    assert summary.exit_code() == 0, logs
    assert added < 120, f"the node came late in the work ({added} of 160 shards committed)"
    # which of the two Ray places first is its choice: the other one waits
    assert any(re.match(r"replica [12] waits for the cluster to grow", m) for m in logs), logs
    assert not any("not placed within" in m for m in logs), logs
    assert len(_pids(out)) == 2, ("the replica on the added node committed shards too", logs)
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), ids, n=1)


def test_a_replica_range_is_read_its_mistakes_named_and_kuberay_follows_it():
    import pytest as _pytest

    from illada_batch.errors import SpecError
    from illada_batch.job.render import _cluster_spec

    base = {"name": "r", "input": {"url": "/tmp/in.parquet"}, "output": {"url": "/tmp/out"}}
    spec = spec_from_dict({**base, "replicas": {"min": 2, "max": 6}})
    assert spec.replica_range == (2, 6) and spec_from_dict({**base, "replicas": 3}).replica_range == (3, 3)
    group = _cluster_spec(spec, "img")["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)
    for bad, says in (({"min": 3, "max": 2}, "max (2) is below min (3)"), ({"min": 1}, "replicas.max"),
                      (0, "at least 1 replica"), ("x", "a number of replicas or a range")):
        with _pytest.raises(SpecError, match="replicas") as err:
            spec_from_dict({**base, "replicas": bad})
        assert says in str(err.value)
