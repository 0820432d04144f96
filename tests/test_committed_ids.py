"""An id already committed in the output is never generated again (issue 23, item 2): the
duplicate check lets ids in committed shards win over any new row with the same id,
whatever the listing order of the files added later; and an output inside its own input
folder is never read back as input."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pipeline_support import assert_exactly_once, job_dict, read_output, write_prompts

from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow

FS = fsspec.filesystem("file")


def add_file(folder: Path, name: str, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_prompts(FS, str(folder / name), ids, ["Input: lamb king bread\nOutput:"] * len(ids), row_group_size=4)


def demo(lo: int, hi: int) -> list[str]:
    return [f"demo-{i:03d}" for i in range(lo, hi)]


def run(folder: Path, n: int = 1, input_url: str | None = None, output_url: str | None = None):
    spec = spec_from_dict(job_dict(input_url or str(folder / "in"), output_url or str(folder / "out"), None, n=n,
                                   shard_rows=4, error_budget=1.0, sampling__steps=2, sampling__gen_length=2,
                                   sampling__block_length=2))
    logs: list[str] = []
    report = run_job(spec, show_progress=False, log=logs.append)
    assert report.exit_code() == 0, logs
    return report, logs


def check_each_id_generated_once(folder: Path, ids: set[str], rows_in: int, n: int) -> None:
    """Every input row is in the output once per sample; each id generated exactly once per
    sample, its other rows errors that name it."""
    t = read_output(FS, str(folder / "out"))
    assert t.num_rows == rows_in * n, "every input row once per sample"
    generated = [(i, j) for i, j, e in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(),
                                           t.column("error").to_pylist()) if e is None]
    assert sorted(generated) == sorted((i, j) for i in ids for j in range(n)), "each id generated once per sample"
    for i, e in zip(t.column("id").to_pylist(), t.column("error").to_pylist()):
        assert e is None or f"duplicate id {i!r}" in e, e


def test_a_new_file_that_sorts_earlier_does_not_generate_committed_ids_again(ray_cluster, tmp_path):
    """The issue's case: b.parquet (demo-000..007) run; then a.parquet (demo-004..011), which
    sorts first. Before the fix demo-004..007 were generated a second time, exit 0."""
    add_file(tmp_path / "in", "b.parquet", demo(0, 8))
    run(tmp_path, n=2)
    add_file(tmp_path / "in", "a.parquet", demo(4, 12))
    run(tmp_path, n=2)
    check_each_id_generated_once(tmp_path, set(demo(0, 12)), 16, n=2)
    t = read_output(FS, str(tmp_path / "out"))
    errors = [e for e in t.column("error").to_pylist() if e]
    assert len(errors) == 8 and all("already in the output" in e and "b.parquet" in e for e in errors), errors


FILES = st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 12), st.integers(1, 8)), min_size=2, max_size=3,
                 unique_by=lambda f: f[0])


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each example is a job
@given(files=FILES)
def test_files_added_over_runs_with_overlapping_ids_generate_each_id_once(ray_cluster, tmp_path_factory, files):
    """Files (name, first id, count) added one per run, in any name order, ids overlapping
    across files: after every run each id is generated exactly once, every row is there."""
    work = tmp_path_factory.mktemp("ids")
    ids, rows_in = set(), 0
    for name, lo, count in files:
        add_file(work / "in", f"{name}.parquet", demo(lo, lo + count))
        ids |= set(demo(lo, lo + count))
        rows_in += count
        run(work)
        check_each_id_generated_once(work, ids, rows_in, n=1)
    shutil.rmtree(work)


def test_an_output_inside_its_input_folder_is_never_read_back(ray_cluster, tmp_path):
    add_file(tmp_path / "data", "a.parquet", demo(0, 6))
    urls = dict(input_url=str(tmp_path / "data"), output_url=str(tmp_path / "data" / "out"))
    first, _ = run(tmp_path, **urls)
    again, logs = run(tmp_path, **urls)
    assert again.shards == first.shards and "nothing to do" in logs[0], logs
    assert_exactly_once(read_output(FS, str(tmp_path / "data" / "out")), demo(0, 6), n=1)
