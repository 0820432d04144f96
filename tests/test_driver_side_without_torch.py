"""The driver side runs on a machine without torch: ``validate``, ``render`` and ``status``
in a subprocess where ``import torch`` fails (a ``torch`` package that raises on import is
first on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_torch_env(tmp_path):
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed on this machine (test)')\n")
    path = os.pathsep.join([str(fake.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _cli(env, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "illada_batch.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_fake_torch_really_fails(no_torch_env):
    res = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True)
    assert res.returncode != 0 and "torch is not installed" in res.stderr


@pytest.mark.slow
def test_validate_render_and_status_run_without_torch(no_torch_env, tmp_path):
    res = _cli(no_torch_env, "validate", "jobs/demo.yaml", "--set", f"output.url={tmp_path}/out")
    assert res.returncode == 0, res.stderr
    assert "job demo" in res.stdout
    res = _cli(no_torch_env, "render", "rayjob", "jobs/nightly.yaml", "--date", "2026-11-27")
    assert res.returncode == 0, res.stderr
    assert "kind: RayJob" in res.stdout
    res = _cli(no_torch_env, "status", str(tmp_path / "out"))
    assert "Traceback" not in res.stderr and "torch" not in res.stderr, res.stderr
    assert str(tmp_path / "out") in res.stdout + res.stderr
