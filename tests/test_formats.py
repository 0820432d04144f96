"""JSON Lines and CSV prompt files: planned by row ranges, read with pyarrow's readers, the
same checks as Parquet (a bad line named by file and line, a missing column named, a value of
the wrong type an error row), on local files, on the S3 server, and as a job on local Ray."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import assert_exactly_once, job_dict, read_output

from illada_batch.engine.requests import sample_seed
from illada_batch.job.driver import run_job
from illada_batch.job.idcheck import mark_duplicate_ids_bounded
from illada_batch.job.replica import ShardReplica
from illada_batch.job.shards import mark_duplicate_ids, plan_shards, read_shard
from illada_batch.job.spec import spec_from_dict

COLUMNS = ["id", "prompt"]
WORDS = "lamb king bread water stone fire tree gold light house".split()


def prompts(k: int) -> list[str]:
    return [f"Input: {WORDS[i % 10]} {WORDS[(i + 3) % 10]}\nOutput:" for i in range(k)]  # two lines each


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def csv_text(ids: list[str], texts: list[str]) -> str:
    quoted = ('"' + t.replace('"', '""') + '"' for t in texts)
    return "id,prompt\n" + "".join(f"{i},{q}\n" for i, q in zip(ids, quoted))


def write_all_three(fs, root: str, k: int = 7) -> dict[str, list[str]]:
    """The same k prompts as Parquet, JSON Lines and CSV, ids prefixed by format."""
    ids = {f: [f"{f}{i}" for i in range(k)] for f in ("pq", "jl", "cs")}
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/a.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ids["pq"], "prompt": prompts(k)}), f, row_group_size=3)
    with fs.open(f"{root}/b.jsonl", "w") as f:
        f.write(jsonl([{"id": i, "prompt": p} for i, p in zip(ids["jl"], prompts(k))]))
    with fs.open(f"{root}/c.csv", "w") as f:
        f.write(csv_text(ids["cs"], prompts(k)))
    with fs.open(f"{root}/notes.txt", "w") as f:  # not a prompt file: a directory listing skips it
        f.write("not prompts")
    return ids


def check_row_ranges(fs, url: str, options: dict, root: str, k: int = 7) -> None:
    shards, bad = plan_shards(url, options, 3, COLUMNS, "id")
    assert not bad
    by_file: dict[str, list] = {}
    for s in shards:
        by_file.setdefault(Path(s.path).name, []).append((s.row_start, s.num_rows))
    assert by_file == {name: [(0, 3), (3, 3), (6, 1)] for name in ("a.parquet", "b.jsonl", "c.csv")}
    for s in shards:
        table = read_shard(fs, s, COLUMNS)
        assert table.column("prompt").to_pylist() == prompts(k)[s.row_start:s.row_start + s.num_rows], s
    marked, bad = mark_duplicate_ids(url, options, shards, "id")
    assert not bad and all(not s.duplicates for s in marked)


def test_jsonl_and_csv_are_sharded_by_row_ranges_like_parquet(tmp_path):
    fs = fsspec.filesystem("file")
    write_all_three(fs, str(tmp_path / "in"))
    check_row_ranges(fs, str(tmp_path / "in"), {}, str(tmp_path / "in"))
    # a glob naming only some formats
    shards, _ = plan_shards(str(tmp_path / "in" / "*.jsonl"), {}, 64, COLUMNS, "id")
    assert [Path(s.path).name for s in shards] == ["b.jsonl"]


@pytest.mark.slow
def test_jsonl_and_csv_on_the_s3_server(s3):
    fs = s3.fs()
    write_all_three(fs, "bucket/formats")
    check_row_ranges(fs, "s3://bucket/formats/", s3.options, "bucket/formats")


def test_a_bad_line_fails_its_file_naming_the_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [{"id": f"g{i}", "prompt": p} for i, p in enumerate(prompts(4))]
    lines = jsonl(good).splitlines()
    (src / "broken.jsonl").write_text("\n".join([lines[0], "", lines[1], '{"id": "x", "prompt": oops', lines[2]]) + "\n")
    (src / "array.json").write_text(json.dumps(good))  # a JSON array, not one object per line
    (src / "ragged.csv").write_text('id,prompt\na,"x"\nb,"y"\nc,"z",extra\n')
    (src / "ok.jsonl").write_text(jsonl(good))
    shards, bad = plan_shards(str(src), {}, 64, COLUMNS, "id")
    assert [Path(s.path).name for s in shards] == ["ok.jsonl"]
    errors = {Path(p).name: e for p, e in bad}
    assert errors["broken.jsonl"].startswith(f"{src / 'broken.jsonl'}: line 4: not valid JSON (")
    assert errors["array.json"].startswith(f"{src / 'array.json'}: line 1: not a JSON object")
    assert errors["ragged.csv"].startswith(f"{src / 'ragged.csv'}: line 4: 3 fields, the header has 2")


def test_a_missing_column_is_named(tmp_path):
    (tmp_path / "t.jsonl").write_text(jsonl([{"id": "a", "text": "hi"}]))
    (tmp_path / "t.csv").write_text("id,text\na,hi\n")
    for name in ("t.jsonl", "t.csv"):
        shards, bad = plan_shards(str(tmp_path / name), {}, 64, COLUMNS, "id")
        assert not shards and bad == [(str(tmp_path / name),
                                       f"{tmp_path / name}: missing column(s) prompt (has id, text)")]


@pytest.mark.parametrize("header", ["id,prompt,prompt", "id,id,prompt", "prompt,id,note,id,prompt"])
def test_a_header_that_repeats_a_needed_column_fails_its_file_alone(tmp_path, header):
    src = tmp_path / "in"
    src.mkdir()
    names = header.split(",")
    (src / "a-twice.csv").write_text(header + "\n" + ",".join(f"v{k}" for k in range(len(names))) + "\n")
    (src / "b-ok.csv").write_text(csv_text(["b0"], prompts(1)))
    shards, bad = plan_shards(str(src), {}, 64, COLUMNS, "id", "prompt")
    assert [Path(s.path).name for s in shards] == ["b-ok.csv"]
    twice = ", ".join(repr(c) for c in COLUMNS if names.count(c) > 1)
    path = src / "a-twice.csv"
    assert bad == [(str(path), f"{path}: column(s) {twice} appear more than once in the header (has {', '.join(names)})")]


def test_compressed_files_are_read_empty_files_have_no_rows_and_skipped_files_are_named(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(jsonl([{"id": "a0", "prompt": prompts(1)[0]}]).encode()))
    (src / "b.csv.bz2").write_bytes(bz2.compress(csv_text(["b0", "b1"], prompts(2)).encode()))
    (src / "c.JSONL").write_text(jsonl([{"id": "c0", "prompt": prompts(1)[0]}]))
    (src / "d.jsonl").write_bytes(b"")
    (src / "e.csv").write_bytes(b"")
    (src / "f.parquet.gz").write_bytes(b"")  # a Parquet file compresses its own pages
    (src / "notes.txt").write_text("not prompts")
    notes: list[str] = []
    shards, bad = plan_shards(str(src), {}, 64, COLUMNS, "id", "prompt", note=notes.append)
    assert not bad
    fs = fsspec.filesystem("file")
    assert {Path(s.path).name: read_shard(fs, s, COLUMNS).column("id").to_pylist() for s in shards} == {
        "a.jsonl.gz": ["a0"], "b.csv.bz2": ["b0", "b1"], "c.JSONL": ["c0"]}
    assert notes == [f"input.url {src}: skipped 2 file(s) that are not prompt files by their name (.parquet, .jsonl, "
                     f".json, .csv, optionally .gz, .bz2 or .xz): f.parquet.gz, notes.txt",
                     f"{src / 'd.jsonl'}: no rows, nothing to generate",
                     f"{src / 'e.csv'}: no rows, nothing to generate"]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_csv_values_are_text_as_written(tmp_path, bom):
    """Every column, with or without Excel's byte-order mark: no number, no null word guessed."""
    path = tmp_path / "p.csv"
    path.write_bytes(bom + b'id,prompt,score\n007,"Input: lamb\nOutput:",1.5\n,"",\n8,plain,x\nNA,null,N/A\n')
    fs = fsspec.filesystem("file")
    (shard,), _ = plan_shards(str(path), {}, 64, ["id", "prompt", "score"], "id", "prompt")
    assert read_shard(fs, shard, ["id", "prompt", "score"]).to_pylist() == [
        {"id": "007", "prompt": "Input: lamb\nOutput:", "score": "1.5"},  # a quoted newline stays in the prompt
        {"id": None, "prompt": "", "score": None},  # empty: null; quoted empty: ""
        {"id": "8", "prompt": "plain", "score": "x"},
        {"id": "NA", "prompt": "null", "score": "N/A"}]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    return spec_from_dict(job_dict(str(root / "in"), str(root / "out"), None, n=2)).resolved()


@pytest.fixture(scope="module")
def generate(spec):
    """Plans ``path`` (a file or folder) as the driver does (id and prompt columns checked, ids
    repeated across files marked), runs every shard through one replica (n=2, the tiny model);
    returns (output rows, bad files)."""
    out = spec.output.url
    rep = ShardReplica(spec.model_dump_json(), out, spec.fingerprint())

    def run(path: Path) -> tuple[list[dict], list]:
        i = spec.input
        shards, bad = plan_shards(str(path), {}, 3, i.columns(), i.id_column, i.text_column())
        if shards:
            shards, unreadable = mark_duplicate_ids_bounded(str(path), {}, shards, i.id_column)
            bad += unreadable
        rows = []
        for s in shards:
            rows += pq.read_table(f"{out}/{rep.process(s.to_dict()).data_key}").to_pylist()
        return rows, bad

    return run


@pytest.fixture(scope="module")
def replica(generate):
    def process(path: Path) -> dict:
        rows, bad = generate(path)
        assert not bad
        return {(r["id"], r["sample_index"]): r for r in rows}

    return process


def test_wrong_types_are_error_rows_not_a_failed_shard(replica, tmp_path):
    """pyarrow's JSON reader refuses a column whose type changes between lines; the file is read
    line by line instead and the odd values become error rows, the rest is generated."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl([{"id": "a", "prompt": prompts(1)[0]}, {"id": "b", "prompt": 5},
                           {"id": "c", "prompt": None}, {"id": "d", "prompt": ["a", "list"]},
                           {"id": "e", "prompt": prompts(2)[1]}]))
    got = replica(path)
    assert sorted(got) == [(i, j) for i in "abcde" for j in (0, 1)]
    errors = {i: got[(i, 0)]["error"] for i in "abcde"}
    assert errors == {"a": None, "b": "prompt is int, expected a string", "c": "prompt is null",
                      "d": "prompt is list, expected a string", "e": None}
    assert all(got[(i, j)]["generation"] for i in "ae" for j in (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_job_over_text_files_on_s3_commits_every_sample_once(fmt, s3, ray_cluster):
    fs = s3.fs()
    ids = [f"{fmt}-{i:02d}" for i in range(12)]
    text = jsonl([{"id": i, "prompt": p} for i, p in zip(ids, prompts(12))]) if fmt == "jsonl" \
        else csv_text(ids, prompts(12))
    with fs.open(f"bucket/job-{fmt}/prompts.{fmt}", "w") as f:
        f.write(text)
    spec = spec_from_dict(job_dict(f"s3://bucket/job-{fmt}/", f"s3://bucket/out-{fmt}", s3, shard_rows=5))
    report = run_job(spec, show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0 and report.this_run.shards == 3 and report.samples == 12
    table = read_output(fs, f"bucket/out-{fmt}")
    assert_exactly_once(table, ids, n=1)
    assert set(table.column("finish_reason").to_pylist()) <= {"eos", "length"}
    assert dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist())) == dict(zip(ids, prompts(12)))


# --- one identity per id, every bad value one error row (issue 23: items 4, 5, 7, 9, 10) ------


IDS = st.one_of(st.integers(-10**6, 10**12), st.from_regex(r"0[0-9]{1,4}", fullmatch=True),
                st.sampled_from(["NA", "null", "N/A", "nan", "TRUE", "1e3", " 7", "7.0", "-0"]),
                st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=6))
FORMATS = ["parquet", "jsonl", "csv", "csv-bom"]


def write_ids(src: Path, placed: list[tuple[object, str]], again: list[int]) -> None:
    """Each (id, format) as a row of that format's file (Parquet: one file of integers, one of
    text); the ids in ``again`` once more as text, in a file that lists last."""
    src.mkdir()
    rows = {f: [i for i, fmt in placed if fmt == f] for f in FORMATS}
    ints = [i for i in rows["parquet"] if isinstance(i, int)]
    for name, ids in (("a-int.parquet", ints), ("b-text.parquet", [i for i in rows["parquet"] if i not in ints])):
        if ids:
            pq.write_table(pa.table({"id": ids, "prompt": prompts(len(ids))}), src / name)
    if rows["jsonl"]:
        (src / "c.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}, ensure_ascii=False) + "\n"
                                             for i, p in zip(rows["jsonl"], prompts(len(rows["jsonl"])))))
    for name, fmt, bom in (("d.csv", "csv", ""), ("e.csv", "csv-bom", "\ufeff")):
        if rows[fmt]:
            (src / name).write_text(bom + csv_of(rows[fmt]), encoding="utf-8")
    if again:
        (src / "z-again.csv").write_text(csv_of([str(i) for i in again]), encoding="utf-8")


def csv_of(ids: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "prompt"])
    w.writerows(zip(ids, prompts(len(ids))))
    return buf.getvalue()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_id_has_one_identity_in_every_format(generate, spec, data):
    """Integers, text with leading zeros, null words, unicode, in Parquet, JSON Lines and CSV (with
    or without a byte-order mark): each row's output id is its id's text, its seed comes from that
    text, and the same id spelt as an integer in one file and as text in another is one id."""
    ids = data.draw(st.lists(IDS, min_size=1, max_size=8, unique_by=str))
    placed = [(i, data.draw(st.sampled_from(FORMATS))) for i in ids]
    again = data.draw(st.lists(st.sampled_from([i for i in ids if isinstance(i, int)] or [None]), unique=True))
    again = [i for i in again if i is not None]
    src = Path(tempfile.mkdtemp(dir=spec.output.url.rsplit("/", 1)[0])) / "in"
    write_ids(src, placed, again)
    rows, bad = generate(src)
    assert not bad
    generated = [(r["id"], r["sample_index"], r["seed"]) for r in rows if r["error"] is None]
    assert sorted(generated) == sorted((str(i), j, sample_seed(spec.seed, str(i), j)) for i in ids for j in (0, 1))
    repeats = [(r["id"], r["error"]) for r in rows if r["error"] is not None]
    assert sorted(repeats) == sorted((str(i), f"duplicate id '{i}' (first seen at {where(placed, i)})")
                                     for i in again for _ in (0, 1))


def where(placed: list, i) -> str:
    """``row R of FILE``: where ``write_ids`` put id ``i``."""
    fmt = dict(placed)[i]
    same = [x for x, f in placed if f == fmt and (fmt != "parquet" or isinstance(x, int) == isinstance(i, int))]
    name = {"jsonl": "c.jsonl", "csv": "d.csv", "csv-bom": "e.csv"}.get(fmt) or \
        ("a-int.parquet" if isinstance(i, int) else "b-text.parquet")
    return f"row {same.index(i)} of {name}"


# each kind of bad value: how it is written on a JSON Lines line, in a CSV field, and the error row's text
BAD = {
    "int": ('5', None, "prompt is int, expected a string"),
    "float": ('1.5', None, "prompt is float, expected a string"),
    "bool": ('true', None, "prompt is bool, expected a string"),
    "object": ('{"text": "hi"}', None, "prompt is dict, expected a string"),
    "list": ('["a", "b"]', None, "prompt is list, expected a string"),
    "null": ('null', b"", "prompt is null"),
    "empty": ('""', b'""', "prompt is empty"),
    "utf8": (b'"Input: \xff\xfe lamb"', b'"Input: \xff\xfe lamb"', "prompt is not valid UTF-8"),
    "utf8-id": (None, None, "id is not valid UTF-8"),
}


def bad_text_file(src: Path, fmt: str, kinds: list[str], bom: bool) -> Path:
    """Row k: id ``r<k>``, a good prompt, or (kind) a bad value written as that format writes it."""
    lines = [b"id,prompt"] if fmt == "csv" else []
    for k, what in enumerate(kinds):
        row_id = b"r\xff" if what == "utf8-id" else f"r{k}".encode()
        good = prompts(k + 1)[k]
        if fmt == "jsonl":
            value = BAD[what][0] if what in BAD and BAD[what][0] is not None else json.dumps(good)
            lines.append(b'{"id": "' + row_id + b'", "prompt": ' + (value.encode() if isinstance(value, str) else value) + b"}")
        else:
            value = BAD[what][1] if what in BAD and BAD[what][1] is not None else ('"' + good + '"').encode()
            lines.append(row_id + b"," + value)
    path = src / f"rows.{fmt}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    return path


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["jsonl", "csv"]), bom=st.booleans(),
       kinds=st.lists(st.sampled_from(["good", *BAD]), min_size=1, max_size=7).filter(lambda k: "good" in k))
def test_each_bad_value_is_one_error_row_and_every_good_row_is_generated(generate, spec, fmt, bom, kinds):
    """A JSON Lines line whose prompt is a number, an object, a list, null, empty or invalid
    UTF-8 (or whose id is invalid UTF-8), a CSV field that is empty or invalid UTF-8: planned as
    the driver plans (prompt column checked), each is one error row per sample naming its
    column, and every other row is generated."""
    kinds = [k for k in kinds if fmt == "jsonl" or BAD.get(k, (0, 0))[1] is not None or k in ("good", "utf8-id")]
    src = Path(tempfile.mkdtemp(dir=spec.output.url.rsplit("/", 1)[0]))
    rows, bad = generate(bad_text_file(src, fmt, kinds, bom))
    assert not bad
    want = [(None if what == "utf8-id" else f"r{k}", j, BAD[what][2] if what in BAD else None)
            for k, what in enumerate(kinds) for j in (0, 1)]
    got = [(r["id"], r["sample_index"], r["error"] and r["error"].split(" (")[0]) for r in rows]
    assert sorted(got, key=str) == sorted(want, key=str)
    assert all(r["generation"] for r in rows if r["error"] is None)
