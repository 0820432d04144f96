"""Real parts for pipeline tests: an S3-compatible server (moto's standalone server) on
127.0.0.1 in its own process, a local Ray cluster, Parquet inputs, a small trained model."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 app on 127.0.0.1:PORT in its own process (``s3_server.py``); it can be
    paused (SIGSTOP: connections hang) or restarted (connections reset, nothing listens for
    ``down_seconds``, then the same port serves the same objects)."""

    def __init__(self, down_seconds: float = 3.0, check_credentials: bool = False) -> None:
        self.port = free_port()
        # moto checks credentials against its (empty) IAM when this is 0: every key is unknown
        self.env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.down_seconds = down_seconds
        self.proc: subprocess.Popen | None = None
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

    def start(self) -> "S3Server":
        script = Path(__file__).with_name("s3_server.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port), str(self.down_seconds)],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_listening(30)
        return self

    def wait_listening(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the S3 server on port {self.port} is not listening")

    def restart(self) -> None:
        """Returns once nothing listens on the port (the server comes back by itself)."""
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.05)
            except OSError:
                return
        raise RuntimeError("the S3 server did not go down")

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def options(self) -> dict:
        return {"key": "testing", "secret": "testing", "endpoint_url": self.url}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)


# a dead node noticed within about a second, not Ray's default half minute
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                      "health_check_failure_threshold": 3}


@contextmanager
def local_cluster(workers: int = 0, fast_health_checks: bool = False):
    """A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``): a head
    and ``workers`` worker nodes of 1 CPU each (80 MiB object stores; no dashboard: nothing
    here reads it, and its processes load a busy machine), this process connected;
    yields (the cluster, its worker nodes). Nodes are added and removed by the caller, from
    the main thread (Ray adds a node from there only); all stop at the end.
    ``fast_health_checks``: a node killed is noticed within about a second (for tests that
    kill one; on a very busy machine a live node may then be taken for dead)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():  # a Ray another module started
        ray.shutdown()
    config = {"_system_config": FAST_HEALTH_CHECKS} if fast_health_checks else {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20,
                                                             "include_dashboard": False, **config})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 << 20) for _ in range(workers)]
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes(timeout=120)  # a busy machine starts raylets slowly
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def write_prompts(fs, path: str, ids: list[str], prompts: list, row_group_size: int = 8, **extra) -> None:
    table = pa.table({"id": ids, "prompt": prompts, **extra})
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def read_output(fs, root: str) -> pa.Table:
    return ds.dataset(f"{root}/data", filesystem=fs, format="parquet").to_table()


def assert_exactly_once(table: pa.Table, ids: list[str], n: int) -> None:
    keys = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)), f"duplicate (id, sample) rows: {len(keys) - len(set(keys))}"
    assert set(keys) == {(i, j) for i in ids for j in range(n)}, "missing or unexpected (id, sample) rows"
    gen, err = table.column("generation").to_pylist(), table.column("error").to_pylist()
    assert all((g is None) != (e is None) for g, e in zip(gen, err)), "each row has a generation or an error"


def job_dict(input_url: str, output_url: str, s3: S3Server | None, **overrides) -> dict:
    opts = s3.options if s3 else {}
    spec = {
        "name": "t",
        "model": {"path": "tiny-llada"},
        "input": {"url": input_url, "storage_options": opts, "passthrough": []},
        "prefix": {"text": "Task: Write the same words in reverse order.\n\nInput: lamb king bread\nOutput: bread king lamb\n\n"},
        "sampling": {"steps": 8, "gen_length": 8, "block_length": 8},
        "engine": {"cache": "prefix", "max_batch_size": 8},
        "output": {"url": output_url, "storage_options": opts},
        "replicas": 1, "shard_rows": 8, "max_retries": 2,
    }
    for k, v in overrides.items():
        node = spec
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return spec


def run_job_killing_a_replica(spec, committed_pid, delay: float = 0.0, poll: float = 0.1, timeout: float = 120.0):
    """Run ``spec`` while a thread SIGKILLs the first replica ``committed_pid()`` names (one that
    has committed a shard and so works on the next), ``delay`` seconds after it shows up.
    Asserts the kill happened, the driver saw the replica die and the job still succeeded."""
    import threading

    from illada_batch.job.driver import run_job

    killed = []

    def killer():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            pid = committed_pid()
            if pid:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(poll)

    t = threading.Thread(target=killer)
    t.start()
    logs: list[str] = []
    report = run_job(spec, show_progress=False, log=logs.append)
    t.join()
    assert killed, "the replica was never killed"
    # the driver says why it died (Ray's exit detail), not only the exception's type
    assert any(re.search(r"replica died: \w+Error: \S", m) for m in logs), logs
    assert report.exit_code() == 0
    return report
