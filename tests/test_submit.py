"""`illada-batch submit` against a real Ray head with the job-submission server (started by
the test on 127.0.0.1): the spec travels in the runtime env, the job runs to completion,
and a second submission for the same date is refused as a duplicate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pipeline_support import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--disable-usage-stats", "--block",
                             f"--temp-dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}"],  # short: socket paths
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Ray head's job server did not come up")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def submit(address, env, out, *extra):
    return subprocess.run([sys.executable, "-m", "illada_batch.cli", "submit", str(REPO / "jobs" / "demo.yaml"),
                           "--address", address, "--date", "2026-11-27", "--set", f"output.url={out}/{{job}}/{{date}}",
                           "--set", "sampling.steps=8", "--set", "sampling.gen_length=8", "--set",
                           "sampling.block_length=8", *extra], env=env, capture_output=True, text=True, timeout=600)


def test_submit_runs_the_job_and_refuses_a_duplicate(ray_head, tmp_path):
    address, env = ray_head
    first = submit(address, env, tmp_path, "--wait")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.splitlines()[0] == "illada-demo-2026-11-27"
    out = tmp_path / "demo" / "2026-11-27"
    assert (out / "_SUCCESS.json").exists(), first.stdout[-2000:]
    assert len(list((out / "_manifest").iterdir())) == 4
    again = submit(address, env, tmp_path)
    assert again.returncode == 0 and "already submitted" in again.stdout, again.stdout + again.stderr
