"""The night, rehearsed (issue 20, item 5): the nightly's own command, as its schedule runs
it, on a local Ray cluster of several nodes, with the input and the output on the S3 server;
a node is added and a node is lost while the job runs. Afterwards the dated output holds
every row exactly once, its dataset card and the card's plots.

The schedule (``infra/nightly-cronjob.yaml``) renders ``jobs/nightly.yaml`` into a RayJob
(``illada-batch render rayjob``) whose entrypoint runs on the cluster with the spec in an
environment variable; here that entrypoint runs as a driver process of its own, joined to
the cluster by ``RAY_ADDRESS`` (as in a Ray job: a cluster that may grow). The spec's
``--set`` overrides only what the tiny model on CPUs needs: the model, its dtype, the
resources per replica, its K/V budget (bytes: a fraction of a CPU's free memory is GBs),
short generations, small shards, and the S3 server's endpoint."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_support import REPO, assert_exactly_once, local_cluster, read_output, write_prompts

from illada_batch import cli

pytestmark = pytest.mark.slow

DATE = "2026-11-27"
BUCKET = "illada-batch-data"  # jobs/nightly.yaml's own paths on the S3 server
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORDS = "lamb king bread water stone fire tree gold".split()


def rendered_run(s3, capsys) -> tuple[list[str], dict]:
    """The RayJob the schedule renders for DATE: (its entrypoint, its environment variables)."""
    opts = json.dumps(s3.options)
    sets = ["model.path=tiny-llada", "model.dtype=float32", "resources.num_gpus=0", "resources.num_cpus=1",
            "sampling={steps: 8, gen_length: 8, block_length: 8, early_stop: false}", "engine.kv_budget=67108864",
            "shard_rows=2", f"input.storage_options={opts}", f"output.storage_options={opts}"]
    assert cli.main(["render", "rayjob", str(REPO / "jobs" / "nightly.yaml"), "--date", DATE,
                     *(a for s in sets for a in ("--set", s))]) == 0
    job = yaml.safe_load(capsys.readouterr().out)["spec"]
    return shlex.split(job["entrypoint"]), yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]


class Committed:
    """The replicas (their pids) that committed shards, read from the manifests as they appear."""

    def __init__(self, fs, out: str) -> None:
        self.fs, self.out, self.pids = fs, out, {}

    def replicas(self) -> set[int]:
        self.fs.invalidate_cache()
        for key in set(self.fs.glob(f"{self.out}/_manifest/*.json")) - set(self.pids):
            self.pids[key] = json.loads(self.fs.cat(key))["stats"]["pid"]
        return set(self.pids.values())


def wait_for(what, condition, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def test_the_nightly_on_a_cluster_that_loses_a_node_and_gains_one(s3, tmp_path, capsys):
    import matplotlib.image

    fs = s3.fs()
    fs.mkdir(BUCKET)
    ids = [f"q{i:03d}" for i in range(200)]  # 100 shards: work left after each change of the cluster
    write_prompts(fs, f"{BUCKET}/inputs/nightly/part-0.parquet", ids,
                  [f"Reverse: {WORDS[i % 8]} {WORDS[(i + 3) % 8]}" for i in range(len(ids))])
    argv, env_vars = rendered_run(s3, capsys)
    out = f"{BUCKET}/outputs/nightly/{DATE}"
    committed = Committed(fs, out)
    with local_cluster(workers=1, fast_health_checks=True) as (cluster, (lost,)):
        env = {**os.environ, **env_vars, "RAY_ADDRESS": cluster.address, "RAY_USAGE_STATS_ENABLED": "0"}
        log = tmp_path / "run.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], env=env,
                                    stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for("commit from both first replicas", lambda: len(committed.replicas()) >= 2, proc)
            cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
            # a replica of 1 CPU on each node of 1 CPU: a third replica is one on the added node
            wait_for("commit from the added node", lambda: len(committed.replicas()) >= 3, proc)
            at_loss = len(committed.pids)
            cluster.remove_node(lost, allow_graceful=False)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert at_loss < 100, f"the node was lost after the work was done ({at_loss} shards committed)"
    assert re.search(r"replica died: .*retry 1/3", text), text[-3000:]  # its shards in flight, redone
    assert_exactly_once(read_output(fs, out), ids, n=1)
    card = fs.cat(f"{out}/README.md").decode()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert {"_card/throughput.png", "_card/lengths.png", "_card/finish_reasons.png"} <= set(links), card
    for link in links:
        body = fs.cat(f"{out}/{link}")
        assert body.startswith(PNG_SIGNATURE), link
        assert matplotlib.image.imread(io.BytesIO(body), format="png").ndim == 3, link
    assert json.loads(fs.cat(f"{out}/_SUCCESS.json"))["output"] == f"s3://{out}"
