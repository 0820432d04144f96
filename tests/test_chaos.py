"""Chaos: a 2,400-row job on the S3 server while replicas are killed at random moments
(SIGKILL, several times) and the S3 server is restarted once. Every (id, sample) ends in
the output exactly once, and the summary's counts equal the rows in the data files."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pyarrow.compute as pc
import pytest
from pipeline_support import assert_exactly_once, job_dict, read_output, write_prompts

from illada_batch.job.driver import run_job, status
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow

WORDS = "lamb king bread water stone fire tree gold light house".split()
KILLS = 4


def test_replicas_killed_and_s3_restarted_mid_job(s3, ray_cluster):
    fs = s3.fs()
    ids = []
    for f in range(3):
        fid = [f"c{f}-{i:04d}" for i in range(800)]
        prompts = [f"Input: {WORDS[i % 10]} {WORDS[(i + 3) % 10]}\nOutput:" for i in range(800)]
        write_prompts(fs, f"bucket/chaos/part-{f}.parquet", fid, prompts, row_group_size=100)
        ids += fid
    spec = spec_from_dict(job_dict("s3://bucket/chaos/", "s3://bucket/chaos-out", s3, replicas=2, shard_rows=100,
                                   max_retries=6, retry_backoff_s=0.2, sampling__steps=1, sampling__gen_length=2,
                                   sampling__block_length=2, engine__max_batch_size=32))
    rng = random.Random(13)
    events: list[str] = []
    stop = threading.Event()

    def live_replica_pid() -> int | None:
        """The pid of a replica that committed recently (so most likely alive and working)."""
        try:
            files = fs.ls("bucket/chaos-out/_manifest", refresh=True)
        except FileNotFoundError:
            return None
        bodies = [json.loads(fs.cat_file(f)) for f in files]
        return max(bodies, key=lambda b: b["committed_at"])["stats"]["pid"] if bodies else None

    def chaos():
        while not stop.is_set() and len(events) < KILLS + 1:
            time.sleep(rng.uniform(0.5, 2.5))
            if len([e for e in events if e.startswith("kill")]) == 2 and "s3" not in events:
                s3.restart()  # connections reset, 3 s down, then the same objects
                events.append("s3")
                continue
            pid = live_replica_pid()
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    events.append(f"kill {pid}")
                except ProcessLookupError:
                    pass

    t = threading.Thread(target=chaos)
    t.start()
    logs: list[str] = []
    try:
        summary = run_job(spec, show_progress=False, log=logs.append)
    finally:
        stop.set()
        t.join()
    kills = [e for e in events if e.startswith("kill")]
    assert len(kills) >= 3 and "s3" in events, f"not enough chaos happened during the job: {events}"
    assert summary.exit_code() == 0, logs
    assert any("replica died" in m for m in logs), logs
    fs.invalidate_cache()  # the chaos thread listed _manifest/ while data/ was being written
    table = read_output(fs, "bucket/chaos-out")
    assert_exactly_once(table, ids, n=1)
    errors = table.num_rows - pc.sum(pc.is_null(table.column("error"))).as_py()
    tokens = pc.sum(table.column("num_tokens")).as_py()
    for s in (summary, status("s3://bucket/chaos-out", s3.options)):
        assert (s.samples, s.errors, s.tokens, s.rows) == (table.num_rows, errors, tokens, len(ids))
    assert len(fs.ls("bucket/chaos-out/data", refresh=True)) == summary.shards == 24, "orphans removed"
