"""What the CLI says when a job cannot run as given: one line and exit 2 for a run it refuses
(never a traceback), and `validate` finding before any cluster work what would fail every
row or hang: unknown template fields, a prompt column of numbers, a missing model, an
output that cannot be written, resources the cluster lacks. Each failed before the fix."""

from __future__ import annotations

import re
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


# --- the spec: what is in the fingerprint, what a budget means ----------------------------


def leaf_fields(model, at: str = "") -> list[str]:
    """Every field of a spec model, nested models opened up (``sampling.steps``)."""
    from pydantic import BaseModel

    out = []
    for name, f in model.model_fields.items():
        kind = f.annotation
        out += leaf_fields(kind, f"{at}{name}.") if isinstance(kind, type) and issubclass(kind, BaseModel) else \
            [f"{at}{name}"]
    return out


# one other value for every field of a job spec: a field added without one fails below
OTHER = {
    "name": "other", "backend": "vllm", "model.path": "other-model", "model.sha256": "ab" * 32,
    "model.dtype": "float32", "model.storage_options": {"anon": True}, "input.url": "other.parquet",
    "input.id_column": "key", "input.prompt_column": "text", "input.messages_column": "messages",
    "input.variables": ["topic"], "input.passthrough": ["x"], "input.storage_options": {"anon": True},
    "input.check_duplicate_ids": False, "prefix.text": "Other.", "prefix.file": "prefix.txt",
    "template": "Q: {prompt}", "chat": True, "response_template": "{slot:4}", "sampling.steps": 16,
    "sampling.gen_length": 64, "sampling.block_length": 16, "sampling.temperature": 0.5, "sampling.cfg_scale": 1.0,
    "sampling.remasking": "random", "sampling.threshold": 0.9, "sampling.early_stop": False,
    "sampling.suppress_eos": True, "sampling.zero_eos_confidence": True, "engine.cache": "blocks",
    "engine.max_batch_size": 3, "engine.kv_budget": 0.5, "engine.tensor_parallel_size": 2, "engine.prefill_chunk": 64, "n": 2, "seed": 1,
    "output.url": "elsewhere",
    "output.storage_options": {"anon": True}, "replicas": 2, "resources.num_gpus": 1, "resources.num_cpus": 2,
    "shard_rows": 7, "max_retries": 1, "retry_backoff_s": 1.0, "error_budget": 0.1, "placement_timeout_s": 5.0,
    "stall_warning_s": 5.0, "base_dir": "/elsewhere", "sampling.alg": "entropy", "sampling.alg_temp": 0.5,
    "sampling.transfer_rule": "block_schedule", "sampling.editing_threshold": 0.8, "sampling.max_post_steps": 3,
}
NEEDS = {"sampling.alg_temp": {"sampling.alg": "entropy"}, "sampling.max_post_steps": {"sampling.editing_threshold": 0.8}}  # a field valid only beside another


def test_every_spec_field_is_in_the_fingerprint_or_declared_token_neutral(tmp_path):
    """Before: engine.cache was in neither, and a resume under another cache mode mixed
    outputs. Each field, changed alone, changes the fingerprint unless it is one of
    ``TOKEN_NEUTRAL`` (the prefix enters as its text's hash, from text or file alike)."""
    from illada_batch.job.fingerprint import TOKEN_NEUTRAL
    from illada_batch.job.spec import JobSpec, spec_from_dict

    assert set(leaf_fields(JobSpec)) == set(OTHER), "give a new field a value here, and decide its side"
    (tmp_path / "prefix.txt").write_text("From a file.")
    base = {"name": "fp", "input": {"url": "in.parquet"}, "sampling": {"steps": 32, "gen_length": 32}}

    def fingerprint(path: str, value, also: dict = {}) -> str:  # noqa: B006 - read only
        raw = yaml.safe_load(yaml.safe_dump(base))
        for where, what in ({path: value, **also} if path != "base_dir" else also).items():
            node = raw
            *parents, last = where.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = what
        if path == "input.messages_column":
            raw["template"] = "{prompt}"
        return spec_from_dict(raw, base_dir=value if path == "base_dir" else str(tmp_path),
                              runs_here=False).fingerprint()

    for path, value in OTHER.items():
        also = NEEDS.get(path, {})
        same = fingerprint("name", "fp", also)
        neutral = path in TOKEN_NEUTRAL or path.split(".")[0] in TOKEN_NEUTRAL - {"prefix"}
        assert (fingerprint(path, value, also) == same) == neutral, f"{path}: {'in' if neutral else 'not in'} the fingerprint"


def test_cache_off_unquoted_is_accepted(tmp_path):
    from illada_batch.job.spec import load_spec

    path = spec_file(tmp_path)
    path.write_text(path.read_text() + "engine:\n  cache: off\n")  # YAML reads off as false
    assert load_spec(path).engine.cache.value == "off"
    assert load_spec(spec_file(tmp_path), ["engine.cache=off"]).engine.cache.value == "off"


@pytest.mark.parametrize("value, words", [
    (True, "engine.kv_budget: true is no budget: give bytes"),
    (False, "engine.kv_budget: false is no budget"),
    (1, "engine.kv_budget: 1 is ambiguous: write 1.0 for all of the device's free memory, or a number of bytes"),
    (0, "engine.kv_budget: must be > 0"),
])
def test_a_kv_budget_that_means_nothing_clear_is_refused(tmp_path, value, words):
    from illada_batch.errors import SpecError
    from illada_batch.job.spec import load_spec

    with pytest.raises(SpecError, match=re.escape(words)):
        load_spec(spec_file(tmp_path), [f"engine.kv_budget={str(value).lower()}"])
    budgets = [load_spec(spec_file(tmp_path), [f"engine.kv_budget={v}"]).engine.budget() for v in ("1.0", "0.25", "4096")]
    assert budgets == [1.0, 0.25, 4096] and [type(b) for b in budgets] == [float, float, int]


def test_a_kv_budget_too_small_for_the_block_modes_is_refused_before_work_and_stops_a_job_once(tmp_path, capsys):
    """Before: validate said OK, and each replica loaded the model and failed, five times."""
    from illada_batch.engine.diffusion import Engine
    from illada_batch.job.pool import FATAL

    path = spec_file(tmp_path, engine={"cache": "blocks", "kv_budget": 100_000})
    code, out = validate(path, capsys=capsys)
    assert code == 1 and "PROBLEM   engine.kv_budget: 100,000 bytes hold 1 pages of 16 tokens; cache 'blocks' needs " \
                          "64" in out, out
    assert validate(spec_file(tmp_path, engine={"cache": "prefix", "kv_budget": 100_000}), capsys=capsys)[0] == 0
    with pytest.raises(FATAL, match="kv_budget=100000: 1 pages, but cache 'blocks' needs 64"):
        Engine.from_pretrained("tiny-llada", cache="blocks", kv_budget=100_000)


def test_the_summary_and_the_dataset_card_record_the_cache_mode(tmp_path):
    from illada_batch.job.progress import card
    from illada_batch.job.records import JobSummary
    from illada_batch.job.spec import load_spec

    spec = load_spec(spec_file(tmp_path, engine={"cache": "blocks"}))
    summary = JobSummary(output="out", job="refuse", cache="blocks", shards=1, shards_committed=1)
    assert JobSummary.from_dict(summary.to_dict()).cache == "blocks"
    assert "| engine.cache | blocks |" in card(spec, summary)


# --- the command line: a bad argument is one line and exit 2 -----------------------------

BAD_ARGUMENTS = {  # each was a traceback, or a misleading exit, before
    "generate --prompt ''": (["generate", "--prompt", ""], "--prompt is empty"),
    "generate --device cuda": (["generate", "--prompt", "x", "--device", "cuda"], "--device cuda: this machine has "
                                                                                   "no CUDA device"),
    "generate --device nope": (["generate", "--prompt", "x", "--device", "nope"], "--device nope: not a device"),
    "generate --response-template with {prompt}": (["generate", "--prompt", "x", "--response-template",
                                                    "{prompt} {slot:4}"], "response_template: {prompt} is a row column"),
    "eval --rows-per-task 0": (["eval", "--rows-per-task", "0"], "argument --rows-per-task: must be at least 1, got 0"),
    "eval --prefixes-per-task 0": (["eval", "--prefixes-per-task", "0"], "argument --prefixes-per-task: must be at "
                                                                        "least 1"),
    "eval --batch-size 0": (["eval", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    "bench --cache nonsense": (["bench", "--cache", "prefix,nonsense"], "--cache 'nonsense': not one of off, prefix"),
    "bench --only nonsense": (["bench", "--only", "nonsense"], "--only 'nonsense': not one of modes, long"),
    "bench --model-shape nope": (["bench", "--model-shape", "nope", "--random-weights"],
                                 "--model-shape 'nope': not one of llada2-mini, llada2-flash, llada-moe, llada-8b, tiny, "
                                 "dream-7b"),
    "bench --model-shape llada2-flash --tp 8 on CPU": (["bench", "--model-shape", "llada2-flash", "--random-weights",
                                                        "--tp", "8"],
                                                       "--model-shape llada2-flash --tp 8: needs 8 CUDA GPUs on one node"),
    "bench --model-shape llada2-flash --tp 3": (["bench", "--model-shape", "llada2-flash", "--random-weights", "--tp", "3"],
                                                "--model-shape llada2-flash --tp 3: config.json field "
                                                "'num_attention_heads'=32 does not divide by tensor_parallel_size=3"),
    "bench --model-shape llada2-mini on CPU": (["bench", "--model-shape", "llada2-mini", "--random-weights"],
                                               "--model-shape llada2-mini: needs a CUDA GPU (16.3B parameters"),
    "bench --model-shape dream-7b on CPU": (["bench", "--model-shape", "dream-7b", "--random-weights"],
                                            "--model-shape dream-7b: needs a CUDA GPU"),
    "bench --model-shape without --random-weights": (["bench", "--model-shape", "tiny"],
                                                     "--model-shape needs --random-weights"),
    "bench --model-shape with --tp": (["bench", "--model-shape", "tiny", "--random-weights", "--tp", "2"],
                                      "--model-shape tiny --tp 2: needs 2 CUDA GPUs on one node"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_a_bad_command_line_is_one_line_and_exit_2(case):
    import os
    import subprocess
    import sys

    import torch

    argv, words = BAD_ARGUMENTS[case]
    if ("cuda" in argv or "CUDA GPU" in words) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "illada_batch.cli", *argv], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "ILLADA_THREADS": "1"})
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1 and words in res.stderr, res.stderr


def test_validate_names_the_files_an_output_holds_that_the_job_did_not_write(tmp_path, capsys):
    """What `run` refuses before any work, `validate` says first: an output folder holding a
    user's files (here their own README and a data/ file), named, left untouched."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "README.md").write_text("# mine\n")
    (out / "data" / "mine.parquet").write_bytes(b"PAR1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, text = validate(spec_file(tmp_path), capsys=capsys)
    assert code == 1 and "holds files this job did not write (README.md, data/mine.parquet)" in text, text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_blockdiff_bench_on_a_model_without_block_causal_attention_is_refused(tmp_path, capsys):
    """`bench --only blockdiff --model M` runs M (it used to run the tiny LLaDA 2.x whatever
    --model said); a bidirectional M has no exact block cache to measure: one line, exit 2."""
    assert cli_run("bench", "--only", "blockdiff", "--model", "tiny-llada", "--out", str(tmp_path / "b.json")) == 2
    err = capsys.readouterr().err
    assert "llada is not block-causal" in err and "--model" in err and "Traceback" not in err


def test_prefill_chunk_where_nothing_would_chunk_is_refused(tmp_path, capsys):
    """`engine.prefill_chunk` did nothing, silently, for a bidirectional model (no prefill to
    chunk: its prompt is re-read every step) and for the vLLM backend (its own scheduler
    chunks prompts): validate, the Engine and the spec now say so, naming the field."""
    from illada_batch.engine.diffusion import Engine
    from illada_batch.errors import ParamsError, SpecError
    from illada_batch.job.spec import spec_from_dict

    code, out = validate(spec_file(tmp_path, engine={"prefill_chunk": 64}), capsys=capsys)
    assert code == 1 and "PROBLEM   engine.prefill_chunk: chunked prefill is for block-causal models" in out, out
    assert "llada attends bidirectionally" in out
    with pytest.raises(ParamsError, match="prefill_chunk=64: chunked prefill is for block-causal models"):
        Engine.from_pretrained("tiny-llada", prefill_chunk=64)
    raw = {"name": "v", "backend": "vllm", "model": {"path": "tiny-qwen2"}, "input": {"url": str(tmp_path)},
           "output": {"url": str(tmp_path / "out")}, "engine": {"prefill_chunk": 64}}
    with pytest.raises(SpecError, match="engine.prefill_chunk: the diffusion engine's chunked prefill; vLLM"):
        spec_from_dict(raw, runs_here=False)
    assert Engine.from_pretrained("tiny-llada2", prefill_chunk=64).prefill_chunk == 64  # block-causal: honoured
