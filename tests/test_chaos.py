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
        write_prompts(fs, f"bucket/chaos/part-{f}.parquet", fid, prompts, row_group_size=50)
        ids += fid
    spec = spec_from_dict(job_dict("s3://bucket/chaos/", "s3://bucket/chaos-out", s3, replicas=2, shard_rows=50,
                                   max_retries=6, retry_backoff_s=0.2, sampling__steps=16, sampling__gen_length=16,
                                   sampling__block_length=16, engine__max_batch_size=32))
    rng = random.Random(13)
    events: list[str] = []
    stop = threading.Event()

    def working_replica_pid() -> int | None:
        """The pid of the replica that committed last, unless already killed or gone (a replica
        with no shard left retires): it is at work."""
        try:
            bodies = [json.loads(fs.cat_file(f)) for f in fs.ls("bucket/chaos-out/_manifest", refresh=True)]
        except Exception:  # noqa: BLE001 - none yet, or the server is down (restarting)
            return None
        pids = [b["stats"]["pid"] for b in sorted(bodies, key=lambda b: b["committed_at"])]
        return pids[-1] if pids and pids[-1] not in tried else None

    tried: set[int] = set()

    def real_kills() -> int:
        return sum(1 for e in events if e.startswith("kill") and "gone" not in e)

    def chaos():  # each kill a random moment after a replica (a new one, after a kill) commits
        # 48 shards of 16 steps keep the job running for several kills even on a quiet machine (24 shards
        # of one step finished after two)
        while not stop.is_set() and (real_kills() < KILLS or "s3" not in events):
            if real_kills() >= 2 and "s3" not in events:
                time.sleep(rng.uniform(0.0, 1.0))
                s3.restart()  # connections reset, 3 s down, then the same objects
                events.append("s3")
                continue
            pid = working_replica_pid()
            if pid is None:
                time.sleep(0.1)
                continue
            time.sleep(rng.uniform(0.0, 0.4))
            tried.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                events.append(f"kill {pid}")
            except ProcessLookupError:
                events.append(f"kill {pid} (gone)")

    t = threading.Thread(target=chaos)
    t.start()
    logs: list[str] = []
    try:
        summary = run_job(spec, show_progress=False, log=logs.append)
    finally:
        stop.set()
        t.join()
    kills = [e for e in events if e.startswith("kill") and "gone" not in e]
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
    assert len(fs.ls("bucket/chaos-out/data", refresh=True)) == summary.shards == 48, "orphans removed"
