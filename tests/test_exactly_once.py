"""Exactly once across runs into one output (DESIGN.md, "Commit"), and an exit code that is
a function of the output: a resume trusts a manifest only when its fingerprint matches and
its row range (file, size and version, first row, row count) is one the plan holds; a
finished job's verdict is the same whichever run reads it.

Runs go through ``illada-batch run`` (``cli.main``) on one local Ray cluster; refusals
happen before any cluster work."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import assert_exactly_once, read_output

from illada_batch import cli

pytestmark = pytest.mark.slow

GOOD = "Input: lamb king bread\nOutput:"


def write_input(path: Path, ids: list[str], prompts: list | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts or [GOOD] * len(ids)}), path, row_group_size=4)


def spec_file(folder: Path, **extra) -> Path:
    spec = {"name": "once", "model": {"path": "tiny-llada"}, "input": {"url": str(folder / "in")},
            "sampling": {"steps": 2, "gen_length": 2, "block_length": 2},
            "engine": {"cache": "prefix", "max_batch_size": 16}, "output": {"url": str(folder / "out")},
            "shard_rows": 16, "max_retries": 1, "retry_backoff_s": 0, **extra}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(path: Path, *sets: str) -> int:
    """``illada-batch run`` in this process: its exit code (2 for a one-line error)."""
    try:
        return cli.main(["run", str(path), "--quiet", *[a for s in sets for a in ("--set", s)]])
    except SystemExit as exc:
        return exc.code


def output(folder: Path):
    return read_output(fsspec.filesystem("file"), str(folder / "out"))


def ids(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def test_shard_rows_changed_between_runs_is_refused(ray_cluster, tmp_path, capsys):
    """The issue's case: 20 rows with shard_rows 16, then 8. Before the fix the second run
    resumed 2 of 3 shards and wrote rows 8-15 twice (28 rows for 20 ids), exit 0."""
    write_input(tmp_path / "in" / "a.parquet", ids(20))
    path = spec_file(tmp_path)
    assert run(path) == 0
    capsys.readouterr()
    assert run(path, "shard_rows=8") == 2
    err = capsys.readouterr().err
    assert "rows 0-15 of" in err and "the plan has rows 0-7" in err and "shard_rows" in err, err
    assert_exactly_once(output(tmp_path), ids(20), n=1)

    # A crash before one shard committed, then the change: refused too (before the fix: rows lost, exit 0).
    manifests = sorted((tmp_path / "out" / "_manifest").glob("*.json"))
    manifests[-1].unlink()
    (tmp_path / "out" / "_SUCCESS.json").unlink()
    assert run(path, "shard_rows=8") == 2
    assert "shard_rows" in capsys.readouterr().err
    # with the shard_rows that made it, the run resumes and completes exactly once
    assert run(path) == 0
    assert_exactly_once(output(tmp_path), ids(20), n=1)


def test_an_input_file_that_grew_was_replaced_or_left_is_refused(ray_cluster, tmp_path, capsys):
    write_input(tmp_path / "in" / "a.parquet", ids(6))
    write_input(tmp_path / "in" / "b.parquet", ids(3, "b"))
    path = spec_file(tmp_path)
    assert run(path) == 0
    capsys.readouterr()
    kept = tmp_path / "b.parquet"
    shutil.move(tmp_path / "in" / "b.parquet", kept)  # left the listing: its rows are in no shard of this plan
    assert run(path) == 2
    assert re.search(r"rows 0-2 of \S+b\.parquet are in no shard of this plan", capsys.readouterr().err)
    shutil.move(kept, tmp_path / "in" / "b.parquet")  # back, as it was (same size and mtime)
    assert run(path) == 0
    write_input(tmp_path / "in" / "a.parquet", ids(9))  # grew: its one shard would now hold 9 rows
    assert run(path) == 2
    assert re.search(r"a\.parquet changed since it was committed \(size \d+ -> \d+", capsys.readouterr().err)
    write_input(tmp_path / "in" / "a.parquet", ids(6, "x"))  # replaced: as many rows, other ones
    assert run(path) == 2
    assert "a.parquet changed since it was committed" in capsys.readouterr().err
    assert_exactly_once(output(tmp_path), ids(6) + ids(3, "b"), n=1)


def test_a_new_input_file_adds_its_rows_once(ray_cluster, tmp_path):
    write_input(tmp_path / "in" / "a.parquet", ids(6))
    path = spec_file(tmp_path)
    assert run(path) == 0
    write_input(tmp_path / "in" / "b.parquet", ids(5, "b"))
    assert run(path) == 0
    assert_exactly_once(output(tmp_path), ids(6) + ids(5, "b"), n=1)


def test_exit_code_over_the_error_budget_is_the_same_on_every_run(ray_cluster, tmp_path, capsys):
    """Before the fix the first run exited 1 with "status complete" and no reason, and a
    re-run exited 0 ("already complete"): a scheduler's retry turned a failed night into a
    success."""
    write_input(tmp_path / "in" / "a.parquet", ids(4), [GOOD, "", GOOD, None])
    path = spec_file(tmp_path)
    reason = "FAILED: 2 of 4 samples have an error, over the error budget"
    for _ in range(2):
        assert run(path) == 1
        out = capsys.readouterr().out
        assert reason in out and not re.search(r"status +complete", out), out
    assert cli.main(["status", str(tmp_path / "out")]) == 1
    assert reason in capsys.readouterr().out
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()
    assert json.loads((tmp_path / "out" / "_FAILED.json").read_text())["status"].startswith(reason)
    # the budget is the reader's: with room for the two bad rows the same output is a success
    assert run(path, "error_budget=0.5") == 0
    assert re.search(r"status +complete", capsys.readouterr().out)
    assert cli.main(["status", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "_SUCCESS.json").exists() and not (tmp_path / "out" / "_FAILED.json").exists()


# --- the spec changes between two runs into one output: a property --------------------

BASE_IDS = ids(10)
CHANGES = {  # one field changed, and whether the output's identity changes with it
    "seed": ("seed=1", "refused"),
    "n": ("n=2", "refused"),
    "template": ("template='Q: {prompt}'", "refused"),
    "temperature": ("sampling.temperature=0.5", "refused"),
    "steps": ("sampling.steps=1", "refused"),
    "prefix": ("prefix.text='Reverse.'", "refused"),
    "shard_rows=4": ("shard_rows=4", "refused"),  # 0-3 != 0-5
    "shard_rows=5": ("shard_rows=5", "either"),  # rows 0-4 and 5-9 either way: no conflict
    "shard_rows=10": ("shard_rows=10", "refused"),
    "replicas": ("replicas=2", "accepted"),
    "max_batch_size": ("engine.max_batch_size=3", "accepted"),
    "cache": ("engine.cache=blocks", "refused"),  # tokens differ by cache mode
    "kv_budget": ("engine.kv_budget=300000000", "accepted"),  # pages held at once: speed only
    "error_budget": ("error_budget=0.5", "accepted"),
    "input grew": (None, "refused"),
    "input file added": (None, "accepted"),
}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    """One output made by the base spec (shard_rows 5, 10 rows) in ``work``; kept in
    ``base`` and copied back into ``work`` (the same input URL) for each example."""
    work = tmp_path_factory.mktemp("work")
    write_input(work / "in" / "a.parquet", BASE_IDS)
    assert run(spec_file(work, shard_rows=5)) == 0
    base = tmp_path_factory.mktemp("base")
    for sub in ("in", "out"):
        shutil.copytree(work / sub, base / sub)
    return base, work


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(change=st.sampled_from(sorted(CHANGES)), crashed=st.booleans())
def test_two_runs_with_one_field_changed_end_exactly_once_or_refused(first_run, change, crashed):
    """Every (id, sample) exactly once and made by the second spec, or the second run
    refused with the reason and the first output untouched: never anything else. ``crashed``:
    the first run lost one manifest (killed before committing that shard)."""
    base, work = first_run
    for sub in ("in", "out"):  # copy2: sizes and mtimes kept, so the input file is "the same"
        shutil.rmtree(work / sub)
        shutil.copytree(base / sub, work / sub)
    if crashed:
        sorted((work / "out" / "_manifest").glob("*.json"))[0].unlink()
        (work / "out" / "_SUCCESS.json").unlink()
    setting, expected = CHANGES[change]
    want_ids, n = list(BASE_IDS), 1
    if change == "input grew":
        write_input(work / "in" / "a.parquet", BASE_IDS + ids(3, "g"))
        want_ids += ids(3, "g")
    elif change == "input file added":
        write_input(work / "in" / "b.parquet", ids(3, "b"))
        want_ids += ids(3, "b")
    n = 2 if change == "n" else 1
    path = spec_file(work, shard_rows=5)
    before = {p.name for p in (work / "out" / "_manifest").glob("*.json")}
    code = run(path, *([setting] if setting else []))
    assert code in (0, 2), f"{change}: exit {code}"
    if code == 2:
        assert expected in ("refused", "either"), f"{change} was refused"
        assert {p.name for p in (work / "out" / "_manifest").glob("*.json")} == before, "a refusal writes nothing"
        if not crashed:
            assert_exactly_once(output(work), BASE_IDS, n=1)
        return
    assert expected in ("accepted", "either"), f"{change} was accepted: outputs mixed"
    assert_exactly_once(output(work), want_ids, n=n)
    fingerprints = {json.loads(p.read_text())["fingerprint"] for p in (work / "out" / "_manifest").glob("*.json")}
    summary = json.loads((work / "out" / "_SUCCESS.json").read_text())
    assert fingerprints == {summary["fingerprint"]}, "every shard made by the second spec"
