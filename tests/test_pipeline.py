"""The distributed job end to end: a real local Ray cluster, a real S3-compatible server on
127.0.0.1 (moto), real Parquet, the shipped model. Faults are injected and the committed
output is checked row by row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from pipeline_support import REPO, assert_exactly_once, job_dict, read_output, run_job_killing_a_replica, write_prompts

from illada_batch.job.commit import FingerprintMismatch
from illada_batch.job.driver import run_job, status
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow

WORDS = "lamb king bread water stone fire tree gold light house".split()


def make_input(s3, prefix: str, files: int = 2, rows: int = 12) -> list[str]:
    fs = s3.fs()
    ids = []
    for f in range(files):
        fid = [f"r{f}-{i:03d}" for i in range(rows)]
        prompts = [f"Input: {WORDS[i % 10]} {WORDS[(i + 3) % 10]} {WORDS[(i + 7) % 10]}\nOutput:" for i in range(rows)]
        write_prompts(fs, f"bucket/{prefix}/part-{f}.parquet", fid, prompts, row_group_size=5)
        ids += fid
    return ids


def test_job_on_s3_commits_every_sample_once_and_resumes(s3, ray_cluster):
    ids = make_input(s3, "in1")
    spec = spec_from_dict(job_dict("s3://bucket/in1/", "s3://bucket/out1", s3, n=2, replicas=2))
    report = run_job(spec, show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0 and report.samples == 2 * len(ids)
    # replica-seconds in the summary: a replica's overlapping shards are counted once
    assert 0 < report.this_run.replica_seconds <= 2 * report.this_run.wall_seconds
    fs = s3.fs()
    table = read_output(fs, "bucket/out1")
    assert_exactly_once(table, ids, n=2)
    assert set(table.column("finish_reason").to_pylist()) <= {"eos", "length"}
    assert fs.exists("bucket/out1/_SUCCESS.json") and fs.exists("bucket/out1/README.md")
    st = status("s3://bucket/out1", s3.options)
    assert st.verdict() == "complete" and st.shards_committed == report.shards

    # Re-running a finished job does nothing and says so.
    messages = []
    again = run_job(spec, show_progress=False, log=messages.append)
    assert again.this_run.shards == 0 and again.this_run.skipped == report.shards and "nothing to do" in messages[0]

    # A different fingerprint into the same output is refused, with the reason.
    other = spec_from_dict(job_dict("s3://bucket/in1/", "s3://bucket/out1", s3, n=2, seed=7))
    with pytest.raises(FingerprintMismatch, match="fingerprint"):
        run_job(other, show_progress=False, log=lambda *_: None)


def test_same_rows_same_tokens_whatever_the_sharding(s3, ray_cluster):
    ids = make_input(s3, "in2", files=1, rows=16)
    common = dict(sampling__temperature=0.8, n=2)
    a = spec_from_dict(job_dict("s3://bucket/in2/", "s3://bucket/out2a", s3, shard_rows=16, **common))
    b = spec_from_dict(job_dict("s3://bucket/in2/", "s3://bucket/out2b", s3, shard_rows=3, replicas=2, **common))
    for spec in (a, b):
        assert run_job(spec, show_progress=False, log=lambda *_: None).exit_code() == 0
    fs = s3.fs()

    def rows(root):
        t = read_output(fs, root)
        return {(i, j): g for i, j, g in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(),
                                               t.column("generation").to_pylist())}

    ra, rb = rows("bucket/out2a"), rows("bucket/out2b")
    assert len(ra) == 2 * len(ids) and ra == rb


def _committing_pid(fs, root: str) -> int | None:
    """The pid of a replica that has committed a shard (from its manifest) and so is busy with the next."""
    if not fs.exists(f"{root}/_manifest"):
        return None
    for f in fs.ls(f"{root}/_manifest", refresh=True):
        return json.loads(fs.cat_file(f))["stats"]["pid"]
    return None


def test_replica_killed_mid_shard(s3, ray_cluster):
    ids = make_input(s3, "in3", files=1, rows=40)
    spec = spec_from_dict(job_dict("s3://bucket/in3/", "s3://bucket/out3", s3, sampling__steps=16,
                                   sampling__gen_length=16, sampling__block_length=16, sampling__early_stop=False))
    fs = s3.fs()
    # killed 0.3 s after its first commit: in the middle of its next shard
    report = run_job_killing_a_replica(spec, lambda: _committing_pid(fs, "bucket/out3"), delay=0.3)
    table = read_output(fs, "bucket/out3")
    assert_exactly_once(table, ids, n=1)
    files = fs.ls("bucket/out3/data", refresh=True)
    assert len(files) == report.shards, "orphan attempt files are removed when the job finishes"


def test_driver_killed_then_rerun_does_only_the_rest(s3, ray_cluster, tmp_path):
    ids = make_input(s3, "in4", files=2, rows=24)
    spec_dict = job_dict("s3://bucket/in4/", "s3://bucket/out4", s3, sampling__steps=16, sampling__gen_length=16,
                         sampling__block_length=16, sampling__early_stop=False)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "illada_batch.cli", "run", str(path), "--quiet",
                             "--address", ray_cluster], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = s3.fs()
    deadline = time.time() + 180
    while time.time() < deadline:
        if fs.exists("bucket/out4/_manifest") and len(fs.ls("bucket/out4/_manifest", refresh=True)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed_before = len(fs.ls("bucket/out4/_manifest", refresh=True))
    assert not fs.exists("bucket/out4/_SUCCESS.json")
    report = run_job(spec_from_dict(spec_dict), show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0
    assert report.this_run.skipped >= committed_before >= 2, "a re-run after a crash redoes no committed shard"
    assert report.this_run.shards == report.shards - report.this_run.skipped
    assert_exactly_once(read_output(fs, "bucket/out4"), ids, n=1)


def _job_through_an_outage(s3, name: str, outage, **overrides) -> list[str]:
    """Run a job on S3 and call ``outage()`` once its first shard is committed; every
    (row, sample) must still be committed exactly once. Returns the driver's log."""
    ids = make_input(s3, f"in-{name}", files=1, rows=32)
    spec = spec_from_dict(job_dict(f"s3://bucket/in-{name}/", f"s3://bucket/out-{name}", s3, **overrides))
    logs: list[str] = []
    fs = s3.fs()
    started, ended_outage, errors = [], [], []

    def watch():
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                if fs.exists(f"bucket/out-{name}/_manifest"):
                    started.append(time.time())
                    outage()
                    ended_outage.append(time.time())
                    return
                time.sleep(0.1)
        except Exception as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    report = run_job(spec, show_progress=False, log=logs.append)
    ended = time.time()
    t.join()
    assert not errors, errors
    assert started and ended_outage and started[0] < ended, "the outage did not happen during the job"
    assert report.exit_code() == 0, logs
    assert_exactly_once(read_output(fs, f"bucket/out-{name}"), ids, n=1)
    return logs


def test_s3_server_paused_mid_job(s3, ray_cluster):
    def pause():
        s3.pause()
        time.sleep(3)
        s3.resume()

    _job_through_an_outage(s3, "paused", pause)


def test_s3_server_restarted_mid_job(s3, ray_cluster):
    # connections reset, nothing listens for 3 s, then the same objects come back
    _job_through_an_outage(s3, "restarted", s3.restart)


def test_s3_down_longer_than_the_client_retries_then_the_shards_are_retried(ray_cluster):
    # 15 s down: s3fs/botocore give up on a request in flight, the shard attempt fails with
    # a storage error (not a bad shard), and the driver retries it once the store is back
    from pipeline_support import S3Server

    s3 = S3Server(down_seconds=15).start()
    try:
        s3.fs().mkdir("bucket")
        logs = _job_through_an_outage(s3, "long", s3.restart, max_retries=4)
        retried = [m for m in logs if "; retry " in m]
        assert retried, logs
        assert not any("failed after" in m for m in logs), logs
    finally:
        s3.stop()
