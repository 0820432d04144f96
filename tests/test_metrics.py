"""Every metric the job names (job/metrics.py) reaches Prometheus through Ray's own export:
jobs on a local Ray cluster (one whose replica is killed mid-job, so a shard is retried; one
with an unreadable file, so a shard fails) while a thread reads the node's metrics endpoint
in Prometheus's text format. Ray exports a gauge only while its process holds a value, so
gauges are caught while the jobs run; the counters' totals are checked against the jobs'
outputs."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request

import pytest
from pipeline_support import free_port, job_dict, run_job_killing_a_replica, write_prompts

from illada_batch.job.driver import run_job
from illada_batch.job.metrics import COUNTERS, GAUGES
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow
GOOD = "Input: lamb king bread\nOutput:"


@pytest.fixture(scope="module")
def ray_with_metrics():
    import ray

    os.environ["RAY_metrics_report_interval_ms"] = "500"  # the processes Ray starts read it
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


class Scraper(threading.Thread):
    """Reads ``/metrics`` every half second; keeps the last value of each (name, job) seen, and
    the largest (a gauge of the last shard, say a replacement replica's first, may end at 0)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.seen, self.most, self.stop = port, {}, {}, threading.Event()

    def scrape(self) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for name, labels, value in re.findall(r'^ray_(illada_\w+?)(?:_total)?{([^}]*)} ([0-9.e+-]+)$', text, re.M):
            job = re.search(r'job="([^"]*)"', labels)
            key = (name, job.group(1) if job else None)
            self.seen[key] = float(value)
            self.most[key] = max(self.most.get(key, float(value)), float(value))

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.scrape()


def test_every_metric_reaches_prometheus_from_a_local_cluster(ray_with_metrics, tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    (tmp_path / "in").mkdir()
    ids = [f"r{i}" for i in range(24)]
    # The bad row is in the first shard, so every other shard has two rows reading the prefix's
    # pages: whichever shards the replacement replica ends up with (a kill that lands late, on a
    # loaded machine, leaves it only the last), its hit rate is above 0 from its first shard.
    write_prompts(fs, str(tmp_path / "in" / "a.parquet"), ids, [None] + [GOOD] * 23)
    # 32 steps a shard (about 0.2 s here), so that a kill made just after the first commit lands
    # with shards left: at 8 steps the twelve shards took 0.6 s in all, and a kill 0.3 s after
    # the first commit came after the last one (CI, once)
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), None, name="metrics", shard_rows=2,
                                   error_budget=0.5, resources__num_cpus=1, sampling__steps=32,
                                   sampling__gen_length=32, sampling__block_length=32))

    def committed_pid():
        manifests = list((tmp_path / "out" / "_manifest").glob("*.json"))
        return json.loads(manifests[0].read_text())["stats"]["pid"] if manifests else None

    (tmp_path / "in2").mkdir()
    write_prompts(fs, str(tmp_path / "in2" / "a.parquet"), ids[:4], [GOOD] * 4)
    (tmp_path / "in2" / "b.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    bad = spec_from_dict(job_dict(str(tmp_path / "in2"), str(tmp_path / "out2"), None, name="metrics-bad",
                                  resources__num_cpus=1))
    scraper = Scraper(ray_with_metrics)
    scraper.start()
    summary = run_job_killing_a_replica(spec, committed_pid, delay=0.05)
    bad_summary = run_job(bad, show_progress=False, log=lambda *_: None)
    time.sleep(3)  # a last export of the counters
    scraper.stop.set()
    scraper.join()
    scraper.scrape()
    seen = scraper.seen
    missing = [n for n in [*COUNTERS, *GAUGES] if n != "illada_row_waits_for_pages"
               and (n, "metrics") not in seen and (n, "metrics-bad") not in seen]
    assert not missing, f"not exported: {missing}; seen {sorted(seen)}"
    assert seen[("illada_rows", "metrics")] == 24
    assert seen[("illada_samples", "metrics")] == summary.samples
    assert seen[("illada_tokens", "metrics")] == summary.tokens
    assert seen[("illada_error_rows", "metrics")] == 1
    assert seen[("illada_shards_committed", "metrics")] == summary.shards_committed == 12
    assert seen[("illada_shards_retried", "metrics")] >= 1
    assert seen[("illada_shards_failed", "metrics-bad")] == len(bad_summary.failed) == 1
    assert seen[("illada_replicas_wanted", "metrics")] == 1
    assert 0 < scraper.most[("illada_prefix_page_hit_rate", "metrics")] <= 1


def test_the_grafana_dashboard_draws_every_metric_the_job_exports():
    from pipeline_support import REPO

    board = json.loads((REPO / "cluster" / "grafana-illada.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    drawn = set(re.findall(r"ray_(illada_\w+?)(?:_total)?\b", exprs))
    assert drawn == set(COUNTERS) | set(GAUGES)
