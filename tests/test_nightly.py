"""Nightly semantics on local files: one output partition per date (``output.url`` with
``{date}``), a re-run of a finished date does nothing and says so, one writer per output
at a time (``_LOCK.json``), a stale lock is taken over, ``status`` tells what a partition
holds. Local Ray, started once for the module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_support import REPO, assert_exactly_once, read_output

from illada_batch import cli
from illada_batch.job import storage
from illada_batch.job.commit import LOCK_STALE_SECONDS, LockHeld, Output
from illada_batch.job.driver import run_job, status
from illada_batch.job.spec import spec_from_dict
from illada_batch.job.storage import filesystem

DATE = "2026-11-27"
IDS = [f"n{i}" for i in range(4)]
WORDS = "lamb king bread water stone fire tree gold".split()


def quiet(*_):
    pass


def job(root: Path, **extra) -> dict:
    return {"name": "nightly", "model": {"path": "tiny-llada"}, "input": {"url": str(root / "in")},
            "prefix": {"text": "Task: Write the same words in reverse order.\n\n"},
            "sampling": {"steps": 4, "gen_length": 8, "block_length": 8},
            "engine": {"cache": "prefix", "max_batch_size": 8}, "n": 2,
            "output": {"url": str(root / "out" / "{job}" / "{date}")}, "shard_rows": 2, "max_retries": 1, **extra}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nightly")
    (root / "in").mkdir()
    prompts = [f"Input: {WORDS[i]} {WORDS[i + 2]}\nOutput:" for i in range(len(IDS))]
    pq.write_table(pa.table({"id": IDS, "prompt": prompts}), root / "in" / "part-0.parquet")
    return root


@pytest.fixture(scope="module")
def finished(ray_cluster, root):
    """The job run once for DATE: (spec, report, output folder)."""
    spec = spec_from_dict(job(root))
    report = run_job(spec, date=DATE, show_progress=False, log=quiet)
    return spec, report, root / "out" / "nightly" / DATE


@pytest.fixture
def settle(monkeypatch):
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.05)


@pytest.mark.slow
def test_first_run_writes_the_dated_partition(finished):
    spec, report, out = finished
    assert report.exit_code() == 0
    assert report.output == str(out) and report.shards == 2 and report.this_run.shards == 2
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), IDS, n=2)
    assert (out / "_SUCCESS.json").exists() and (out / "README.md").exists()
    assert not (out / "_LOCK.json").exists(), "the lock is released at the end"
    assert sorted(p.name for p in (out.parent).iterdir()) == [DATE]


@pytest.mark.slow
def test_rerun_of_a_finished_date_does_nothing_and_says_so(finished):
    spec, report, out = finished
    before = snapshot(out)
    assert "_SUCCESS.json" in before and any(k.startswith("data/") for k in before)
    logs: list[str] = []
    again = run_job(spec, date=DATE, show_progress=False, log=logs.append)
    assert again.this_run.shards == 0 and again.exit_code() == 0
    assert again.this_run.skipped == report.shards and again.samples == report.samples
    assert "nothing to do" in logs[0] and str(out) in logs[0] and re.search(r"status +complete\n", logs[1])
    assert snapshot(out) == before, "a re-run changes no file: data/, _manifest/, _SUCCESS.json, README.md"


@pytest.mark.slow
def test_status_of_a_finished_partition(finished, root, capsys):
    spec, report, out = finished
    st = status(str(out))
    assert st.verdict() == "complete" and st.shards_committed == st.shards == report.shards == 2
    assert st.failed == {} and st.samples == 2 * len(IDS) and st.errors == 0 and st.rows == len(IDS)
    assert st.fingerprint == spec.resolved().fingerprint()

    assert cli.main(["status", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "complete" and printed["shards_committed"] == 2 and printed["rows"] == len(IDS)
    assert cli.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"status +complete\n", text) and "2 committed / 2" in text

    never = root / "out" / "nightly" / "2026-01-01"
    st = status(str(never))
    assert st.verdict() == f"no output at {never}" and st.exit_code() == 1
    assert cli.main(["status", str(never)]) == 1
    assert f"no output at {never}" in capsys.readouterr().out


@pytest.mark.slow
def test_another_date_writes_another_partition(finished, root):
    spec, _, out = finished
    before = snapshot(out)
    report = run_job(spec, date="2026-11-28", show_progress=False, log=quiet)
    other = root / "out" / "nightly" / "2026-11-28"
    assert report.output == str(other)
    assert report.exit_code() == 0 and report.this_run.shards > 0 and report.this_run.skipped == 0 and report.this_run.shards == 2
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(other)), IDS, n=2)
    assert json.loads((other / "_SUCCESS.json").read_text())["output"] == str(other)
    assert snapshot(out) == before, "the other date's partition is untouched"


def test_lock_held_by_another_run(root, tmp_path, settle):
    spec = spec_from_dict(job(root, output={"url": str(tmp_path / "{job}" / "{date}")}))
    out_dir = tmp_path / "nightly" / DATE
    holder = Output(*filesystem(str(out_dir), {}))
    holder.acquire_lock("other-run")
    lock = json.loads((out_dir / "_LOCK.json").read_text())
    with pytest.raises(LockHeld) as info:
        run_job(spec, date=DATE, show_progress=False, log=quiet)
    msg = str(info.value)
    assert "being written by other-run" in msg and "not starting a second run" in msg and str(out_dir) in msg
    assert sorted(p.name for p in out_dir.iterdir()) == ["_LOCK.json"], "the loser wrote nothing"
    assert json.loads((out_dir / "_LOCK.json").read_text()) == lock, "the holder keeps its lock"

    # A lock that is old but not yet stale still holds.
    (out_dir / "_LOCK.json").write_text(json.dumps({"owner": "slow-run", "heartbeat": time.time() - LOCK_STALE_SECONDS + 60}))
    with pytest.raises(LockHeld, match="slow-run"):
        run_job(spec, date=DATE, show_progress=False, log=quiet)
    # Once the holder releases it, the output is free again (for Output; no Ray needed here).
    (out_dir / "_LOCK.json").unlink()
    other = Output(*filesystem(str(out_dir), {}))
    other.acquire_lock("next-run")
    with pytest.raises(LockHeld, match="next-run"):
        holder.acquire_lock("other-run")
    other.release_lock("next-run")
    assert not (out_dir / "_LOCK.json").exists()


@pytest.mark.slow
def test_stale_lock_is_taken_over(ray_cluster, root, tmp_path, settle):
    spec = spec_from_dict(job(root, output={"url": str(tmp_path / "{job}" / "{date}")}))
    out_dir = tmp_path / "nightly" / DATE
    out_dir.mkdir(parents=True)
    stale = {"owner": "dead-run", "heartbeat": time.time() - LOCK_STALE_SECONDS - 60}
    (out_dir / "_LOCK.json").write_text(json.dumps(stale))
    report = run_job(spec, date=DATE, show_progress=False, log=quiet)
    assert report.exit_code() == 0 and report.this_run.shards == 2
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out_dir)), IDS, n=2)
    assert (out_dir / "_SUCCESS.json").exists()
    assert not (out_dir / "_LOCK.json").exists(), "the new owner releases the lock it took over"


@pytest.mark.slow
def test_cli_run_refuses_a_locked_output(root, tmp_path, settle):
    spec_path = tmp_path / "nightly.yaml"
    spec_path.write_text(yaml.safe_dump(job(root, output={"url": str(tmp_path / "out" / "{job}" / "{date}")})))
    out_dir = tmp_path / "out" / "nightly" / DATE
    Output(*filesystem(str(out_dir), {})).acquire_lock("other-run@host-7")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-m", "illada_batch.cli", "run", str(spec_path), "--date", DATE, "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("illada-batch: error: "), res.stderr
    assert "other-run@host-7" in lines[0] and str(out_dir) in lines[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["_LOCK.json"]


def test_default_date_is_the_utc_date(root):
    spec = spec_from_dict(job(root))
    old = os.environ.get("TZ")
    try:
        for tz in ("Etc/GMT+12", "Etc/GMT-14"):  # at any instant one of them is on another date than UTC
            os.environ["TZ"] = tz
            time.tzset()
            utc = dt.datetime.now(dt.timezone.utc).date().isoformat()
            assert spec.output_url() == str(root / "out" / "nightly" / utc), tz
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
