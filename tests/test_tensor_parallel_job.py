"""A job with ``engine.tensor_parallel_size: 2`` on local Ray (2 CPUs: one rank each, both in
one placement group): every (row, sample) exactly once, the same generations as TP 1; and
with rank 1 killed mid-job, the whole replica is replaced and still every row once."""

from __future__ import annotations

import json

import fsspec
import pytest
from pipeline_support import assert_exactly_once, job_dict, read_output, run_job_killing_a_replica, write_prompts

from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow


def _input(tmp_path, rows: int) -> list[str]:
    (tmp_path / "in").mkdir()
    ids = [f"r{i}" for i in range(rows)]
    write_prompts(fsspec.filesystem("file"), str(tmp_path / "in" / "a.parquet"), ids,
                  [f"bread king lamb number {i}" for i in range(rows)])
    return ids


def _generations(root) -> dict:
    t = read_output(fsspec.filesystem("file"), str(root))
    return {(i, j): g for i, j, g in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(),
                                           t.column("generation").to_pylist())}


def test_a_tensor_parallel_job_writes_every_row_once_as_tp_1_would(tmp_path, ray_cluster):
    ids = _input(tmp_path, 12)
    outs = {}
    for tp in (1, 2):
        spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / f"out{tp}"), None, n=2,
                                       engine={"cache": "blocks", "max_batch_size": 8, "tensor_parallel_size": tp}))
        assert run_job(spec, show_progress=False, log=lambda *_: None).exit_code() == 0
        assert_exactly_once(read_output(fsspec.filesystem("file"), str(tmp_path / f"out{tp}")), ids, n=2)
        outs[tp] = _generations(tmp_path / f"out{tp}")
    assert outs[2] == outs[1]


def _rank_1_pid(out) -> int | None:
    """Rank 1's pid, once the replica has committed a shard (so it is busy with the next)."""
    # the GCS's actor table, read here only (the ranks are the replica's own actors, and the
    # local Ray has no dashboard for ray.util.state); the job reads none of Ray's private state
    from ray._private import state

    if not (out / "_manifest").exists() or not any((out / "_manifest").iterdir()):
        return None
    alive = [a for a in state.actors().values() if a.get("ActorClassName", "").endswith("Rank")
             and a.get("State") in ("ALIVE", 2) and a.get("Pid")]
    return alive[0]["Pid"] if alive else None


def test_a_rank_killed_mid_job_takes_its_replica_down_and_every_row_is_written_once(tmp_path, ray_cluster):
    ids = _input(tmp_path, 40)
    out = tmp_path / "out"
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(out), None, sampling__steps=16,
                                   sampling__gen_length=16, sampling__block_length=16, sampling__early_stop=False,
                                   engine={"cache": "prefix", "max_batch_size": 8, "tensor_parallel_size": 2}))
    report = run_job_killing_a_replica(spec, lambda: _rank_1_pid(out), delay=0.3, timeout=300)
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), ids, n=1)
    pids = {json.loads(f.read_text())["stats"]["pid"] for f in (out / "_manifest").iterdir()}
    assert len(pids) == 2, "a new replica (a new rank 0) committed after the kill"
    assert report.shards == 5
