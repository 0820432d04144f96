"""What the CLI says when a job cannot run as given: one line and exit 2 for a run it refuses
(never a traceback), and `validate` finding before any cluster work what would fail every
row or hang: unknown template fields, a prompt column of numbers, a missing model, an
output that cannot be written, resources the cluster lacks. Each failed before the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from illada_batch import cli
from illada_batch.model.checkpoint import MODELS_DIR

GOOD = "Input: lamb king bread\nOutput:"


def spec_file(tmp_path: Path, prompts=None, **extra) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    prompts = prompts if prompts is not None else [GOOD, GOOD]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(prompts))], "prompt": prompts}),
                   tmp_path / "in" / "a.parquet")
    spec = {"name": "refuse", "input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
            "sampling": {"steps": 2, "gen_length": 2, "block_length": 2}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli_run(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:
        return exc.code


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("illada-batch: error: ") and err.count("\n") == 1, err
    return err


# --- run: one line, exit 2 ------------------------------------------------------------


def test_an_output_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = spec_file(tmp_path, output={"url": str(tmp_path / "afile" / "out")})
    assert cli_run("run", str(path), "--quiet") == 2  # before: FileNotFoundError from the lock, a traceback
    err = one_line_error(capsys)
    assert f"output.url: {tmp_path / 'afile' / 'out'} cannot be created: {tmp_path / 'afile'} is a file" in err


def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path, capsys):
    path = spec_file(tmp_path)
    assert cli_run("run", str(path), "--set", "sampling.steps=[1", "--quiet") == 2
    assert "--set 'sampling.steps=[1': the value is not valid YAML" in one_line_error(capsys)


def test_a_missing_model_is_refused_before_any_cluster_work(tmp_path, capsys):
    path = spec_file(tmp_path, model={"path": str(tmp_path / "no-such-model")})
    assert cli_run("run", str(path), "--quiet") == 2  # before: 'replica died: ActorDiedError' per shard
    err = one_line_error(capsys)
    assert f"model.path: {tmp_path / 'no-such-model'} is no directory" in err and "tiny-llada" in err
    assert not (tmp_path / "out").exists()


def test_show_when_the_job_wrote_no_data(tmp_path, capsys):
    path = spec_file(tmp_path)
    (tmp_path / "in" / "a.parquet").write_bytes(b"not parquet")  # the only file is bad: nothing generated
    assert cli_run("run", str(path), "--quiet", "--show", "3") == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and f"{tmp_path / 'out'}/data holds no rows to show" in out.out


def test_show_prints_an_empty_generation_as_empty(tmp_path, capsys):
    from illada_batch.job.spec import load_spec

    (tmp_path / "out" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "sample_index": [0, 0], "prompt": [GOOD, None],
                             "generation": ["", None], "error": [None, "prompt is null"]}),
                   tmp_path / "out" / "data" / "part-0.parquet")
    cli._show_rows(str(tmp_path / "out"), load_spec(spec_file(tmp_path)), 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].endswith("-> ''") and lines[-1].endswith("-> error: prompt is null"), lines


# --- validate: what would fail every row, or hang ----------------------------------------


def validate(path: Path, *more: str, capsys) -> tuple[int, str]:
    code = cli_run("validate", str(path), *more)
    return code, capsys.readouterr().out


def test_validate_refuses_a_template_field_the_rows_cannot_fill(tmp_path, capsys):
    path = spec_file(tmp_path, template="{prompt} about {topic}")
    assert cli_run("validate", str(path)) == 2
    err = capsys.readouterr().err
    assert "template: {topic} is neither {prompt} nor one of input.variables (none)" in err, err


def test_validate_says_not_ok_for_a_prompt_column_of_numbers(tmp_path, capsys):
    path = spec_file(tmp_path, prompts=[1, 2])
    code, out = validate(path, capsys=capsys)
    assert code == 1
    assert out.splitlines()[0].startswith("job refuse: NOT OK (1 problem(s) below)"), out  # was "OK", then BAD FILE
    assert "column 'prompt' (the prompt) is int64; expected strings" in out


def test_validate_checks_the_model_and_the_output(tmp_path, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (tmp_path / "afile").write_text("x")
    path = spec_file(tmp_path, model={"path": str(empty)}, output={"url": str(tmp_path / "afile" / "o")})
    code, out = validate(path, capsys=capsys)
    assert code == 1 and "NOT OK (2 problem(s) below)" in out
    assert f"PROBLEM   model.path: {empty} holds no config.json" in out
    assert f"PROBLEM   output.url: {tmp_path / 'afile' / 'o'} cannot be created" in out
    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-llada", model)
    code, out = validate(spec_file(tmp_path, model={"path": str(model)}), capsys=capsys)
    assert code == 0 and "job refuse: OK" in out and "PROBLEM" not in out


@pytest.mark.slow
def test_validate_looks_for_a_model_on_s3(tmp_path, s3, capsys):
    fs = s3.fs()
    fs.put(str(MODELS_DIR / "tiny-llada") + "/", "bucket/models/tiny-llada/", recursive=True)
    for where, ok in (("bucket/models/tiny-llada", True), ("bucket/models/nothing", False)):
        path = spec_file(tmp_path, model={"path": f"s3://{where}", "storage_options": s3.options})
        code, out = validate(path, capsys=capsys)
        assert (code == 0) == ok, out
        assert ok or f"model.path: s3://{where} holds no config.json" in out


@pytest.mark.slow
def test_validate_asks_the_cluster_for_the_resources(tmp_path, ray_cluster, capsys):
    path = spec_file(tmp_path, resources={"num_gpus": 1})
    code, out = validate(path, "--address", ray_cluster, capsys=capsys)
    assert code == 1, out
    assert f"resources: a replica asks for 1 CPU, 1 GPU, which no node of the cluster at {ray_cluster} has" in out
    assert "note      cluster" in out and "2 CPU in total" in out
    code, out = validate(spec_file(tmp_path, replicas=3), "--address", ray_cluster, capsys=capsys)
    assert code == 0 and "the cluster holds 2 of the 3 replicas now" in out, out
    # on a cluster, a local model path is the replicas' nodes' business: missing here is a note
    code, out = validate(spec_file(tmp_path, model={"path": "/models/llada"}), "--address", ray_cluster,
                         capsys=capsys)
    assert code == 0 and "note      model.path: /models/llada is no directory" in out and "on this machine" in out
