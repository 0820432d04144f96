"""Nothing of the user's is touched (issue 23, item 1): a run refuses, before any work, an
output folder that holds files it did not write, and names them; the orphan cleanup removes
only attempt files this output's job recorded writing; the dataset card is only ever
written over a card of the job's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pipeline_support import assert_exactly_once, job_dict, read_output

from illada_batch.errors import OutputError
from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict

pytestmark = pytest.mark.slow

IDS = [f"r{i:02d}" for i in range(12)]


def write_input(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": IDS, "prompt": ["Input: lamb king bread\nOutput:"] * len(IDS)}), path)


def spec(folder: Path, input_url: str | None = None, output_url: str | None = None):
    return spec_from_dict(job_dict(input_url or str(folder / "in"), output_url or str(folder / "out"), None,
                                   shard_rows=4, sampling__steps=2, sampling__gen_length=2,
                                   sampling__block_length=2))


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and mtime (nanoseconds)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def run(s) -> object:
    return run_job(s, show_progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    """A finished output (and its input), copied into each example's folder."""
    base = tmp_path_factory.mktemp("finished")
    write_input(base / "in" / "a.parquet")
    assert run(spec(base)).exit_code() == 0
    return base


FOREIGN = {  # path under the output -> what the user put there
    "data/x.parquet": "parquet",
    "README.md": b"# My project\n\nNotes of mine.\n",
    "notes.txt": b"mine",
    "sub/keep.txt": b"a folder of the user's",
    "data/sub/keep.txt": b"a folder inside data/",
    "_manifest/notes.txt": b"not a record",
    "data/part-0000-000000000000.parquet": "parquet",  # named like an attempt, but recorded by no one
    "_card/throughput.png": b"\x89PNG\r\n\x1a\n a plot of the user's, named like the card's",
    "_card/notes.txt": b"not a plot",
}


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each example is a job
@given(kinds=st.sets(st.sampled_from(sorted(FOREIGN)), min_size=1, max_size=3), over_output=st.booleans())
def test_an_output_holding_files_of_the_users_is_refused_and_left_untouched(finished, tmp_path_factory, kinds,
                                                                             over_output):
    """Any mix of foreign files, in an empty folder or beside a finished output of this very
    job: refused before any work, each one named, not a byte of the folder changed."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(finished / "in", work / "in")
    if over_output:
        shutil.copytree(finished / "out", work / "out")
    for rel in kinds:
        path = work / "out" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if FOREIGN[rel] == "parquet":
            shutil.copy(work / "in" / "a.parquet", path)
        else:
            path.write_bytes(FOREIGN[rel])
    before = snapshot(work / "out")
    with pytest.raises(OutputError, match="holds files this job did not write") as exc:
        run(spec(work))
    for rel in kinds:
        shown = rel.rsplit("/", 1)[0] + "/" if rel.startswith(("sub/", "data/sub/")) else rel
        assert shown in str(exc.value), (shown, str(exc.value))
    assert "\n" not in str(exc.value)
    assert snapshot(work / "out") == before, "a refused run touched the output"


def test_the_jobs_own_input_in_the_outputs_data_folder_is_refused_not_deleted(ray_cluster, tmp_path):
    """The issue's case: output.url is a folder whose data/ holds the job's input. Before the
    fix the job ran and its orphan cleanup deleted the input."""
    write_input(tmp_path / "data" / "prompts.parquet")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"data/prompts\.parquet"):
        run(spec(tmp_path, input_url=str(tmp_path / "data"), output_url=str(tmp_path)))
    assert snapshot(tmp_path) == before


def test_the_card_is_the_jobs_own_and_only_recorded_attempts_are_removed(ray_cluster, tmp_path):
    """A re-run after a crash rewrites the job's own card, and removes the attempt files it
    recorded that no manifest names (a replica killed before its commit), and nothing else."""
    from illada_batch.job.commit import CARD_MARK

    write_input(tmp_path / "in" / "a.parquet")
    assert run(spec(tmp_path)).exit_code() == 0
    out = tmp_path / "out"
    assert (out / "README.md").read_text().rstrip().endswith(CARD_MARK)
    lost = sorted((out / "_manifest").glob("*.json"))[0]  # a crash before this shard's commit...
    lost.unlink()
    (out / "_SUCCESS.json").unlink()
    s = spec(tmp_path)
    report = run(s)
    assert report.exit_code() == 0 and report.this_run.shards == 1 and report.this_run.orphans_removed == 1
    data = sorted(p.name for p in (out / "data").iterdir())
    assert data == sorted(f"{p.stem}.parquet" for p in (out / "_attempts").iterdir()), "records and files agree"
    assert len(data) == report.shards
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), IDS, n=1)
    assert (out / "README.md").read_text().rstrip().endswith(CARD_MARK)


def test_a_card_of_the_jobs_own_is_recognised_in_either_form(tmp_path):
    """Cards carry CARD_MARK; those written before it are known by their fixed text; any other
    README.md is the user's."""
    from illada_batch.job.commit import CARD_MARK, Output
    from illada_batch.job.storage import filesystem

    out = Output(*filesystem(str(tmp_path), {}))
    old_card = ("# t\n\nGenerated by illada-batch with the masked-diffusion model `tiny-llada` (diffusion backend).\n\n"
                "Files: `data/*.parquet`, one row per (id, sample_index). `_manifest/` holds one JSON per committed "
                "shard;\n`_SUCCESS.json` the job summary.\n")
    for text, foreign in ((f"# t\n\n{CARD_MARK}\n", []), (old_card, []), ("# t\n\nGenerated by illada-batch\n", ["README.md"]),
                          ("# My notes\n", ["README.md"])):
        (tmp_path / "README.md").write_text(text)
        assert out.foreign_files({}) == foreign, text


def test_on_s3_foreign_files_are_named_and_only_recorded_attempts_removed(s3):
    """The same rules on an S3 store: the job's records and data files are its own; a user's
    object in data/ or beside it is named, and the orphan cleanup leaves it alone."""
    from illada_batch.job.commit import Output
    from illada_batch.job.records import RowRange, ShardStats
    from illada_batch.job.storage import filesystem

    fs = s3.fs()
    out = Output(*filesystem("s3://bucket/own", s3.options))
    table = pa.table({"id": ["a"], "generation": ["x"]})
    stats = ShardStats(1, 0, 1, 0.0, 0.0, 0.0, "n", 1)
    first = out.write_shard("s0", RowRange("in.parquet", 1, None, 0, 1), table, "fp", stats)
    assert first.data_etag == fs.info(f"bucket/own/{first.data_key}")["ETag"].strip('"')  # the store's checksum
    out.write_shard("s0", RowRange("in.parquet", 1, None, 0, 1), table, "fp", stats)  # a redo: the first is an orphan
    kept = out.manifests()["s0"]
    assert out.foreign_files(out.manifests()) == []
    fs.pipe_file("bucket/own/data/mine.parquet", b"user data")
    fs.pipe_file("bucket/own/notes.txt", b"notes")
    fs.pipe_file("bucket/own/sub/keep.txt", b"folder")
    assert out.foreign_files(out.manifests()) == ["data/mine.parquet", "notes.txt", "sub/"]
    # _manifest/ as read_manifests listed it stands for a second listing: the same names either way
    fs.pipe_file("bucket/own/_manifest/notes.txt", b"notes")
    fs.pipe_file("bucket/own/_manifest/sub/s9.json", b"{}")
    strays = ["_manifest/notes.txt", "_manifest/sub/", "data/mine.parquet", "notes.txt", "sub/"]
    assert out.foreign_files(out.manifests()) == strays
    assert out.foreign_files(out.manifests()) == out.foreign_files(out.manifests()) == strays
    out.manifests()
    out.fs.invalidate_cache()
    assert Output(*filesystem("s3://bucket/own", s3.options)).foreign_files(out.manifests()) == strays
    fs.rm(["bucket/own/_manifest/notes.txt", "bucket/own/_manifest/sub/s9.json"])
    assert out.remove_orphans(out.manifests()) == 1
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bucket/own/data")) == sorted(
        ["mine.parquet", kept.data_key.rsplit("/", 1)[-1]])
    assert fs.cat_file("bucket/own/notes.txt") == b"notes"
