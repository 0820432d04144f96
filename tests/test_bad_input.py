"""Bad input, one test per kind: the message says what is wrong and where, and everything
else still comes through (DESIGN.md, "Failures").

Row level: a plain ``ShardReplica`` (no Ray) processes a local Parquet file and the
rows it committed are read back through the manifest's ``data_key``. File level:
``plan_shards`` and one ``run_job`` on local Ray. Remote: an S3 server on 127.0.0.1 and an
endpoint nothing listens on. Job specs: ``illada-batch validate`` in a subprocess.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_support import REPO, S3Server, assert_exactly_once, free_port, read_output

from illada_batch.errors import InputError, OutputError
from illada_batch.job.driver import run_job
from illada_batch.job.replica import ShardError, ShardReplica
from illada_batch.job.shards import Shard, mark_duplicate_ids, plan_shards
from illada_batch.job.spec import SpecError, load_spec, spec_from_dict
from illada_batch.job.storage import is_transient

COLUMNS = ["id", "prompt"]
SAMPLING = {"steps": 4, "gen_length": 8, "block_length": 8}
GOOD = "Input: lamb king bread\nOutput:"
OK_REASONS = {"eos", "length"}


def spec_dict(input_url: str, output_url: str, **extra) -> dict:
    return {"name": "bad", "model": {"path": "tiny-llada"}, "input": {"url": input_url},
            "sampling": dict(SAMPLING), "engine": {"cache": "prefix", "max_batch_size": 8},
            "output": {"url": output_url}, "shard_rows": 64, "max_retries": 1, **extra}


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def cut_footer_keep_pages(path: Path) -> None:
    """Overwrite the column chunks with noise, keep the footer: planning reads it fine,
    reading the rows fails."""
    b = bytearray(path.read_bytes())
    footer_len = int.from_bytes(b[-8:-4], "little")
    rnd = random.Random(7)
    for i in range(4, len(b) - 8 - footer_len):
        b[i] = rnd.randrange(256)
    path.write_bytes(bytes(b))


# --- row level: a plain replica on local files ---------------------------------------


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """One replica (n=2, the tiny model) shared by the row-level tests; each test hands it
    shards of its own file. Returns ``process(path) -> (manifest, output rows)``."""
    root = tmp_path_factory.mktemp("rows")
    (root / "in").mkdir()
    out = root / "out"
    spec = spec_from_dict(spec_dict(str(root / "in"), str(out), n=2)).resolved()
    rep = ShardReplica(spec.model_dump_json(), str(out), spec.fingerprint())

    def process(path: Path):
        shards, bad = plan_shards(str(path), {}, 64, COLUMNS)
        assert not bad and len(shards) == 1
        manifest = rep.process(shards[0].to_dict())
        rows = pq.read_table(out / manifest.data_key).to_pylist()
        assert manifest.samples == manifest.stats.samples == len(rows)
        assert manifest.stats.errors == sum(r["error"] is not None for r in rows)
        return manifest, rows

    return process


def by_id(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["id"], []).append(r)
    return out


def assert_bad(rows: list[dict], message: str) -> None:
    """A bad row: exactly once per sample (n=2), with the error and no generation."""
    assert sorted(r["sample_index"] for r in rows) == [0, 1], rows
    for r in rows:
        assert r["error"] is not None and message in r["error"], r
        assert r["generation"] is None and r["finish_reason"] == "error" and r["num_tokens"] == 0, r


def assert_good(rows: list[dict]) -> None:
    assert sorted(r["sample_index"] for r in rows) == [0, 1], rows
    for r in rows:
        assert r["error"] is None and r["generation"] is not None, r
        assert r["finish_reason"] in OK_REASONS and r["num_tokens"] > 0, r


def test_null_empty_and_blank_prompts_are_error_rows(replica, tmp_path):
    ids = ["ok1", "null", "empty", "blank", "ok2"]
    path = write(tmp_path / "p.parquet", id=ids, prompt=[GOOD, None, "", "  \n\t ", "Input: tree gold\nOutput:"])
    manifest, rows = replica(path)
    got = by_id(rows)
    assert list(got) == ids and len(rows) == 2 * len(ids)
    assert_bad(got["null"], "prompt is null")
    assert_bad(got["empty"], "prompt is empty")
    assert_bad(got["blank"], "prompt is empty")
    assert_good(got["ok1"])
    assert_good(got["ok2"])
    assert manifest.stats.errors == 6


def test_non_string_prompt_column(replica, tmp_path):
    path = write(tmp_path / "ints.parquet", id=["a", "b", "c"], prompt=pa.array([1, 2, None], pa.int64()))
    _, rows = replica(path)
    got = by_id(rows)
    assert len(rows) == 6
    assert_bad(got["a"], "prompt is int, expected a string")
    assert_bad(got["b"], "prompt is int, expected a string")
    assert_bad(got["c"], "prompt is null")


def test_undecodable_bytes(replica, tmp_path):
    prompts = pa.array([GOOD.encode(), b"Input: \xff\xfe bread\nOutput:", "Input: stone fire\nOutput:".encode()],
                       pa.binary())
    path = write(tmp_path / "bin.parquet", id=["good1", "bad", "good2"], prompt=prompts)
    _, rows = replica(path)
    got = by_id(rows)
    assert len(rows) == 6
    assert_bad(got["bad"], "prompt is not valid UTF-8")
    assert "byte 7" in got["bad"][0]["error"]  # where in the value
    assert_good(got["good1"])
    assert_good(got["good2"])
    assert got["good1"][0]["prompt"] == GOOD  # decoded, not the bytes' repr


def test_prompt_too_long_for_the_model(replica, tmp_path):
    long = "lamb king bread " * 400  # 1200+ tokens > max_sequence_length 1024
    path = write(tmp_path / "long.parquet", id=["short", "long"], prompt=[GOOD, long])
    _, rows = replica(path)
    got = by_id(rows)
    assert_bad(got["long"], "too long")
    assert "1024" in got["long"][0]["error"]
    assert_good(got["short"])


def test_duplicate_and_null_ids(replica, tmp_path):
    path = write(tmp_path / "ids.parquet", id=["a", "b", "a", None, "c"],
                 prompt=[GOOD, "Input: gold tree\nOutput:", "Input: stone\nOutput:", GOOD, GOOD])
    _, rows = replica(path)
    assert len(rows) == 10
    got = by_id(rows)
    first_a = [r for r in got["a"] if r["error"] is None]
    second_a = [r for r in got["a"] if r["error"] is not None]
    assert_good(first_a)
    assert first_a[0]["prompt"] == GOOD  # the first occurrence is the one generated
    assert_bad(second_a, "duplicate id 'a'")
    assert_bad(got[None], "id is null")
    assert_good(got["b"])
    assert_good(got["c"])


def test_ids_repeated_across_shards_and_files_are_error_rows(tmp_path):
    """The driver's planning pass: a row whose id an earlier shard (or file) has is marked in
    its own shard, naming where the id was first seen; repeats inside a shard are left to the
    row check; null ids are not duplicates."""
    src = tmp_path / "in"
    write(src / "a.parquet", id=["a", "b", "c", "a", None], prompt=[GOOD] * 5)
    write(src / "b.parquet", id=["d", "b", None, "e", "e"], prompt=[GOOD] * 5)
    shards, bad = mark_duplicate_ids(str(src), {}, plan_shards(str(src), {}, 2, COLUMNS, "id")[0], "id")
    assert not bad
    marks = {(Path(s.path).name, s.row_start): s.duplicates for s in shards}
    assert marks == {("a.parquet", 0): (), ("a.parquet", 2): ((1, "row 0 of a.parquet"),), ("a.parquet", 4): (),
                     ("b.parquet", 0): ((1, "row 1 of a.parquet"),), ("b.parquet", 2): (),
                     ("b.parquet", 4): ((0, "row 3 of b.parquet"),)}
    shards3, _ = mark_duplicate_ids(str(src), {}, plan_shards(str(src), {}, 3, COLUMNS, "id")[0], "id")
    marks3 = {(Path(s.path).name, s.row_start): s.duplicates for s in shards3}
    assert marks3[("a.parquet", 3)] == ((0, "row 0 of a.parquet"),)
    assert marks3[("b.parquet", 0)] == ((1, "row 1 of a.parquet"),)
    assert marks3[("b.parquet", 3)] == ()  # "e" twice in one shard: the row check reports it
    assert all(Shard.from_dict(s.to_dict()) == s for s in shards3)


def test_an_id_column_of_lists_is_refused_naming_the_file_and_column(tmp_path):
    write(tmp_path / "in" / "ok.parquet", id=[1, 2], prompt=[GOOD, GOOD])
    write(tmp_path / "in" / "lists.parquet", id=[["a"], ["b"]], prompt=[GOOD, GOOD])
    shards, bad = plan_shards(str(tmp_path / "in"), {}, 64, COLUMNS, "id")
    assert [Path(s.path).name for s in shards] == ["ok.parquet"]
    (path, err), = bad
    assert err == f"{path}: column 'id' (the row id) is list<element: string>; expected strings or integers"


def test_an_id_repeated_in_another_shard_is_generated_once(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.parquet", id=["a", "b", "c"], prompt=[GOOD, "Input: fire gold\nOutput:", GOOD])
    write(src / "b.parquet", id=["d", "a", "e"], prompt=[GOOD, "Input: stone\nOutput:", GOOD])
    spec = spec_from_dict({**spec_dict(str(src), str(out), n=2), "shard_rows": 2})
    logs: list[str] = []
    report = run_job(spec, show_progress=False, log=logs.append)
    assert report.complete and report.samples == 12 and report.errors == 2
    assert report.exit_code() == 1 and report.verdict().startswith("FAILED: 2 of 12 samples have an error, over the error budget")
    assert "input: 1 row(s) repeat the id of an earlier row; they are written as error rows" in logs
    rows = read_output(fsspec.filesystem("file"), str(out)).to_pylist()
    got = by_id(rows)
    good = [r for r in got["a"] if r["error"] is None]
    assert_good(good)
    assert good[0]["prompt"] == GOOD  # the first occurrence (a.parquet row 0) is the one generated
    assert_bad([r for r in got["a"] if r["error"] is not None], "duplicate id 'a' (first seen at row 0 of a.parquet)")
    for i in "bcde":
        assert_good(got[i])
    # every generated (id, sample) key is in the output once
    keys = [(r["id"], r["sample_index"]) for r in rows if r["error"] is None]
    assert len(keys) == len(set(keys)) == 10


def test_unreadable_row_groups_fail_the_shard_naming_the_file(replica, tmp_path):
    path = write(tmp_path / "rot.parquet", id=["a", "b"], prompt=[GOOD, GOOD])
    cut_footer_keep_pages(path)
    with pytest.raises(ShardError, match=str(path)):
        replica(path)


# --- file level -------------------------------------------------------------------


@pytest.mark.slow
def test_bad_files_fail_alone(ray_cluster, tmp_path):
    src = tmp_path / "in"
    good_ids = [f"g{i}" for i in range(3)] + [f"h{i}" for i in range(2)]
    write(src / "a-good.parquet", id=good_ids[:3], prompt=[GOOD] * 3)
    write(src / "b-good.parquet", id=good_ids[3:], prompt=["Input: fire gold\nOutput:"] * 2)
    write(src / "missing.parquet", id=["m0"], text=[GOOD])
    (src / "corrupt.parquet").write_bytes(random.Random(1).randbytes(4096))
    whole = io.BytesIO()
    pq.write_table(pa.table({"id": ["t0", "t1"], "prompt": [GOOD, GOOD]}), whole)
    (src / "truncated.parquet").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    write(src / "rot.parquet", id=["r0"], prompt=[GOOD])
    cut_footer_keep_pages(src / "rot.parquet")

    # Planning reads footers only: three files are refused there, each named.
    shards, bad = plan_shards(str(src), {}, 64, COLUMNS)
    assert sorted(Path(s.path).name for s in shards) == ["a-good.parquet", "b-good.parquet", "rot.parquet"]
    errors = dict(bad)
    assert sorted(Path(p).name for p in errors) == ["corrupt.parquet", "missing.parquet", "truncated.parquet"]
    for path, err in errors.items():
        assert err.startswith(f"{path}: "), err
    missing = errors[str(src / "missing.parquet")]
    assert "missing column(s) prompt" in missing and "has id, text" in missing
    assert "not a readable Parquet file" in errors[str(src / "corrupt.parquet")]
    assert "not a readable Parquet file" in errors[str(src / "truncated.parquet")]

    out = tmp_path / "out"
    spec = spec_from_dict(spec_dict(str(src), str(out)))
    logs: list[str] = []
    report = run_job(spec, show_progress=False, log=logs.append)
    assert report.exit_code() == 1 and report.verdict().startswith("FAILED: 4 of 6 shards not committed")
    assert report.shards == 6 and report.this_run.shards == 2 and len(report.failed) == 4
    assert_exactly_once(read_output(fsspec.filesystem("file"), str(out)), good_ids, n=1)
    assert not (out / "_SUCCESS.json").exists()

    failed = [json.loads(p.read_text()) for p in (out / "_failed").glob("*.json")]
    assert len(failed) == 4, [f["shard_id"] for f in failed]
    text = {f["shard_id"]: f["error"] for f in failed}
    for name in ("missing", "corrupt", "truncated"):
        assert any(str(src / f"{name}.parquet") in e for e in text.values()), (name, text)
    rot = [f for f in failed if str(src / "rot.parquet") in f["error"]]
    assert len(rot) == 1 and rot[0]["attempts"] == 1, "a bad shard is not retried"
    assert "cannot read column 'id'" in rot[0]["error"]  # the driver's duplicate-id pass reads it first
    assert all(f["fingerprint"] == spec.fingerprint() for f in failed)
    assert any("missing column(s) prompt" in m for m in logs)


@pytest.mark.slow
def test_a_folder_of_every_kind_of_bad_text_input_runs_its_good_rows(ray_cluster, tmp_path):
    """Issue 23's input classes in one folder, through `validate` and a job on local Ray: an id
    spelt 3 in JSON Lines and "3" in CSV is one id; a CSV with a byte-order mark keeps its ids as
    written (007 and 7 two ids); a JSON Lines prompt that is a number and invalid UTF-8 (JSON
    Lines and CSV) are error rows; a header repeating the prompt column fails its file alone,
    named; compressed JSON Lines is read; empty files have no rows; other files are named."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b'{"id": 3, "prompt": ' + json.dumps(GOOD).encode() + b'}\n{"id": "j1", "prompt": 5}\n'
                                  b'{"id": "j2", "prompt": "Input: \xff"}\n{"id": "j3", "prompt": "Input: fire\\nOutput:"}\n')
    (src / "b.csv").write_bytes(b'\xef\xbb\xbfid,prompt\n3,"' + GOOD.encode() + b'"\n007,gold\n7,tree\nc3,"bad \xff"\n')
    (src / "c.csv").write_text(f'id,prompt,prompt\nx,"{GOOD}",again\n')
    (src / "d.jsonl.gz").write_bytes(gzip.compress(json.dumps({"id": "z", "prompt": GOOD}).encode() + b"\n"))
    (src / "e.jsonl").write_bytes(b"")
    (src / "f.csv").write_bytes(b"")
    (src / "notes.txt").write_text("not prompts")
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict(str(src), str(out))))
    twice = f"{src / 'c.csv'}: column(s) 'prompt' appear more than once in the header (has id, prompt, prompt)"
    skipped = f"input.url {src}: skipped 1 file(s) that are not prompt files by their name"

    res = _cli("validate", str(job), cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"  BAD FILE  {twice}" in res.stdout.splitlines()
    assert f"{src / 'e.jsonl'}: no rows, nothing to generate" in res.stdout
    assert skipped in res.stdout and "notes.txt" in res.stdout
    assert "input     " + str(src) + ": 9 rows in 3 shards" in res.stdout

    logs: list[str] = []
    report = run_job(spec_from_dict(spec_dict(str(src), str(out))), show_progress=False, log=logs.append)
    assert report.exit_code() == 1 and len(report.failed) == 1
    assert any(twice in m for m in logs) and any(m.startswith(skipped) for m in logs)
    assert any(f"{src / 'f.csv'}: no rows" in m for m in logs)
    table = read_output(fsspec.filesystem("file"), str(out))
    assert table.schema.field("id").type == pa.string()
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows if r["error"] is None) == ["007", "3", "7", "j3", "z"]
    assert {r["id"]: r["error"].split(" (")[0] for r in rows if r["error"] is not None} == {
        "j1": "prompt is int, expected a string", "j2": "prompt is not valid UTF-8",
        "3": "duplicate id '3'", "c3": "prompt is not valid UTF-8"}
    assert [r["error"] for r in rows if r["id"] == "3" and r["error"]] == [
        "duplicate id '3' (first seen at row 0 of a.jsonl)"]
    failed = [json.loads(p.read_text()) for p in (out / "_failed").glob("*.json")]
    assert [f["error"] for f in failed] == [twice]


def test_bad_files_with_one_name_in_two_folders_are_both_recorded(tmp_path):
    # No good file: nothing is dispatched, so no Ray.
    src = tmp_path / "in"
    for day in ("day1", "day2"):
        (src / day).mkdir(parents=True)
        (src / day / "part-0.parquet").write_bytes(b"not parquet " + day.encode())
    out = tmp_path / "out"
    report = run_job(spec_from_dict(spec_dict(str(src), str(out))), show_progress=False, log=lambda *_: None)
    assert report.shards == 2 and report.exit_code() == 1
    failed = [json.loads(p.read_text()) for p in (out / "_failed").glob("*.json")]
    named = {d for f in failed for d in ("day1", "day2") if f"/{d}/part-0.parquet" in f["error"]}
    assert named == {"day1", "day2"}, f"each bad file keeps its own _failed/ record: {[f['error'] for f in failed]}"
    assert len(report.failed) == 2


# --- remote -------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_bucket_is_reported_with_the_url(tmp_path):
    s3 = S3Server().start()
    try:
        url = "s3://no-such-bucket/prompts/"
        with pytest.raises(InputError, match="s3://no-such-bucket/prompts/"):
            plan_shards(url, s3.options, 64, COLUMNS)
        # The same through run_job: refused before anything is written.
        spec = spec_from_dict({**spec_dict(url, str(tmp_path / "out")),
                               "input": {"url": url, "storage_options": s3.options}})
        with pytest.raises(InputError, match="s3://no-such-bucket/prompts/"):
            run_job(spec, show_progress=False, log=lambda *_: None)
        assert not (tmp_path / "out").exists()
    finally:
        s3.stop()


@pytest.mark.slow
def test_wrong_credentials_are_reported_with_the_url(tmp_path):
    s3 = S3Server(check_credentials=True).start()
    try:
        url = "s3://bucket/prompts/"
        with pytest.raises(InputError, match=r"input.url s3://bucket/prompts/: access denied .*Access Key"):
            plan_shards(url, s3.options, 64, COLUMNS)
        # the output with wrong credentials: refused before any cluster work, naming output.url
        write(tmp_path / "in" / "p.parquet", id=["a"], prompt=[GOOD])
        spec = spec_from_dict({**spec_dict(str(tmp_path / "in"), "s3://bucket/out"),
                               "output": {"url": "s3://bucket/out", "storage_options": s3.options}})
        with pytest.raises(OutputError, match=r"output.url s3://bucket/out: access denied .*Access Key"):
            run_job(spec, show_progress=False, log=lambda *_: None)
    finally:
        s3.stop()


def test_storage_errors_worth_a_retry_are_told_from_bad_files():
    import pyarrow.lib
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status: int) -> ClientError:
        return ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException:
                raise outer
        except BaseException as exc:  # noqa: BLE001
            return exc

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(client_error(503)) and not is_transient(client_error(403))
    assert is_transient(raised_from(OSError("read failed"), EndpointConnectionError(endpoint_url="http://x")))
    assert not is_transient(raised_from(PermissionError("denied"), client_error(403)))  # s3fs's translation
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(pyarrow.lib.ArrowInvalid("Parquet magic bytes not found"))
    assert not is_transient(OSError("Couldn't deserialize thrift"))


def test_unreachable_endpoint_fails_fast_with_the_url():
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{free_port()}",
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
    for url in ("s3://bucket/prompts/", "s3://bucket/prompts/part-0.parquet"):
        t0 = time.monotonic()
        with pytest.raises(InputError) as info:
            plan_shards(url, options, 64, COLUMNS)
        assert url in str(info.value) and "cannot list" in str(info.value)
        assert time.monotonic() - t0 < 20


# --- job specs ----------------------------------------------------------------------


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "illada_batch.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _bad_spec(tmp_path: Path, **changes) -> Path:
    write(tmp_path / "in" / "p.parquet", id=["a"], prompt=[GOOD])
    raw = spec_dict(str(tmp_path / "in"), str(tmp_path / "out" / "{job}" / "{date}"))
    raw["sampling"] = {**raw["sampling"], **changes.pop("sampling", {})}
    raw.update(changes)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_validate_refuses_a_bad_spec_naming_each_field(tmp_path):
    path = _bad_spec(tmp_path, bogus_key=1, n="two", sampling={"gen_length": 30, "block_length": 8})
    res = _cli("validate", str(path), cwd=tmp_path)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    assert str(path) in res.stderr and "invalid job spec" in res.stderr
    lines = [ln.strip() for ln in res.stderr.splitlines()]
    assert any(ln.startswith("bogus_key: unknown key") for ln in lines), res.stderr
    assert any(ln.startswith("n: ") and "integer" in ln for ln in lines), res.stderr
    assert any(ln.startswith("sampling.gen_length: ") and "gen_length=30" in ln and "block_length=8" in ln
               for ln in lines), res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, field, words", [
    ({"bogus_key": 1}, "bogus_key", "unknown key"),
    ({"sampling": {"tempreature": 0.5}}, "sampling.tempreature", "unknown key"),
    ({"n": "two"}, "n", "integer"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"sampling": {"gen_length": 30, "block_length": 8}}, "sampling.gen_length", "not a multiple"),
    ({"sampling": {"steps": 16}}, "sampling.steps", "steps=16 > gen_length=8"),
    ({"sampling": {"cfg_scale": 1.0}, "prefix": {"text": "Task: reverse.\n"}}, "sampling.cfg_scale", "engine.cache: off"),
    ({"engine": {"cache": "blocks"}, "sampling": {"cfg_scale": 1.0}}, "sampling.cfg_scale", "engine.cache: off"),
    ({"resources": {"num_cpus": -1}}, "resources.num_cpus", "greater than or equal to 0"),
    ({"resources": {"num_gpus": -0.5}}, "resources.num_gpus", "greater than or equal to 0"),
    ({"engine": {"cache": "sometimes"}}, "engine.cache", "'off', 'prefix', 'blocks' or 'prefix+blocks'"),
])
def test_load_spec_names_the_yaml_path(tmp_path, changes, field, words):
    """Each bad field is named by its YAML path, including checks across fields (the spec's
    prefix is cached, so classifier-free guidance is refused before any cluster work)."""
    path = _bad_spec(tmp_path, **changes)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: invalid job spec"
    assert len(lines) == 2 and lines[1].startswith(f"  {field}: ") and words in lines[1], lines


@pytest.mark.slow
def test_validate_demo_spec(tmp_path):
    res = _cli("validate", str(REPO / "jobs" / "demo.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "job demo: OK" in res.stdout
    assert "64 rows in 4 shards of up to 16 rows" in res.stdout
    assert "BAD FILE" not in res.stdout and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # validate writes nothing


def test_every_bad_sampling_field_is_named_at_once(tmp_path):
    path = _bad_spec(tmp_path, sampling={"steps": 0, "gen_length": -8, "temperature": -1, "threshold": 1.5})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    named = {ln.split(":")[0].strip() for ln in str(info.value).splitlines()[1:]}
    assert named == {"sampling.steps", "sampling.gen_length", "sampling.temperature", "sampling.threshold"}
