"""An output that refuses writes mid-run (issue 23, rough edge): the job stops once, at the
first refused write, with one line naming the output; no shard is retried or generated
again; the lock is released where the output still allows it. The folders are made
immutable (``chattr +i``, which binds root too)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import pytest
from pipeline_support import job_dict, write_prompts

from illada_batch.errors import JobStopped
from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")]


def chattr(flag: str, paths: list[Path]) -> None:
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chattr", flag, str(p)], check=True, capture_output=True)


@pytest.mark.parametrize("frozen", [("data",), ("data", "_manifest", "_attempts", "_failed", "")])
def test_an_output_made_read_only_mid_run_stops_once_with_one_line(ray_cluster, tmp_path, frozen):
    ids = [f"r{i:02d}" for i in range(40)]
    write_prompts(fsspec.filesystem("file"), str(tmp_path / "in.parquet"), ids,
                  ["Input: lamb king bread\nOutput:"] * len(ids), row_group_size=4)
    out = tmp_path / "out"
    spec = spec_from_dict(job_dict(str(tmp_path / "in.parquet"), str(out), None, shard_rows=4, max_retries=2))
    paths = [out / f for f in frozen]
    try:  # immutable once the first shard is committed
        if subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode:
            pytest.skip("this filesystem has no immutable flag")
        chattr("-i", [tmp_path])

        def freeze():
            deadline = time.time() + 300
            while time.time() < deadline and not list((out / "_manifest").glob("*.json")):
                time.sleep(0.02)
            chattr("+i", paths)

        t = threading.Thread(target=freeze)
        t.start()
        logs: list[str] = []
        with pytest.raises(JobStopped) as exc:
            run_job(spec, show_progress=False, log=logs.append)
        t.join()
        message = str(exc.value)
        assert "\n" not in message and f"output.url {out}: cannot write (PermissionError" in message, message
        assert not any("retry" in m for m in logs), logs
        committed = len(list((out / "_manifest").glob("*.json")))
        assert 0 < committed < 10, "stopped before the end"
        if "" not in frozen:  # the output itself still takes writes: the stop is recorded, the lock released
            assert not (out / "_LOCK.json").exists()
            assert "cannot write" in (out / "_FAILED.json").read_text()
        else:
            assert any("_LOCK.json is left behind" in m for m in logs), logs
    finally:
        chattr("-i", paths)
