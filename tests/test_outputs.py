"""What a user does with a job beyond the happy path: a model on S3 copied once and checked,
chat-format inputs, and the output read back by the `datasets` library."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import S3Server

from illada_batch.errors import CheckpointError
from illada_batch.job.replica import ShardReplica, fetch_model, weights_sha256
from illada_batch.job.spec import spec_from_dict
from illada_batch.model.checkpoint import MODELS_DIR

SAMPLING = {"steps": 4, "gen_length": 8, "block_length": 8}


def spec(tmp_path, **extra):
    return spec_from_dict({"name": "o", "input": {"url": str(tmp_path / "in.parquet")}, "sampling": SAMPLING,
                           "output": {"url": str(tmp_path / "out")}, **extra}).resolved()


@pytest.mark.slow
def test_model_on_s3_is_copied_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("ILLADA_MODEL_CACHE", str(tmp_path / "cache"))  # the documented cache location
    s3 = S3Server().start()
    try:
        fs = s3.fs()
        fs.mkdir("models")
        fs.put(str(MODELS_DIR / "tiny-llada") + "/", "models/tiny-llada/", recursive=True)
        good = weights_sha256(MODELS_DIR / "tiny-llada")
        model = {"path": "s3://models/tiny-llada", "sha256": good, "storage_options": s3.options}
        s = spec(tmp_path, model=model)
        local = fetch_model(s)
        assert local.startswith(str(tmp_path / "cache"))
        assert sorted(os.listdir(local)) == sorted(os.listdir(MODELS_DIR / "tiny-llada"))
        mtime = os.path.getmtime(os.path.join(local, "model.safetensors"))
        assert fetch_model(s) == local  # copied once
        assert os.path.getmtime(os.path.join(local, "model.safetensors")) == mtime
        bad = spec(tmp_path, model={**model, "sha256": "0" * 64})
        with pytest.raises(CheckpointError, match="sha256"):
            fetch_model(bad)
    finally:
        s3.stop()


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path):
    msgs = [[{"role": "user", "content": "Input: lamb king\nOutput:"}], [], None]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "messages": msgs}), tmp_path / "in.parquet")
    s = spec(tmp_path, chat=True, input={"url": str(tmp_path / "in.parquet"), "prompt_column": None,
                                         "messages_column": "messages"}, prefix={"text": "You reverse words."})
    replica = ShardReplica(s.model_dump_json(), str(tmp_path / "out"), "fp")
    replica.start()
    assert replica.prefix_ids and "<|start_header_id|>system" in replica.tok.decode(list(replica.prefix_ids))
    m = replica.process({"shard_id": "s0", "path": str(tmp_path / "in.parquet"), "row_start": 0, "num_rows": 3})
    out = pq.read_table(tmp_path / "out" / m.data_key).to_pylist()
    a = next(r for r in out if r["id"] == "a")
    assert a["prompt"].startswith("<|start_header_id|>user<|end_header_id|>") and a["prompt"].endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert a["error"] is None and a["generation"] is not None
    assert all("messages" in r["error"] for r in out if r["id"] in ("b", "c"))


def test_output_loads_with_the_datasets_library(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "prompt": ["Input: lamb king\nOutput:"] * 6,
                             "topic": list("abcdef")}), tmp_path / "in.parquet")
    s = spec(tmp_path, n=2, input={"url": str(tmp_path / "in.parquet"), "passthrough": ["topic"]})
    replica = ShardReplica(s.model_dump_json(), str(tmp_path / "out"), "fp")
    replica.process({"shard_id": "s0", "path": str(tmp_path / "in.parquet"), "row_start": 0, "num_rows": 6})
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"),
                               cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == 12
    assert {"id", "sample_index", "generation", "error", "seed", "topic"} <= set(ds.column_names)
    assert sorted(zip(ds["id"], ds["sample_index"])) == sorted((f"r{i}", j) for i in range(6) for j in range(2))


def test_replica_seconds_count_overlapping_shards_once():
    from illada_batch.job.driver import _busy_seconds

    busy = {("a", 1): [(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)], ("a", 2): [(0.0, 3.0)]}
    assert _busy_seconds(busy) == 12.0 + 5.0 + 3.0


def test_manifests_of_the_first_format_are_still_read_and_checked(tmp_path):
    """Before row ranges, a manifest merged its stats into the top level and called the
    sample count `rows`: such an output still resumes, trusted by its sample count."""
    import json

    from illada_batch.errors import RowRangeMismatch
    from illada_batch.job.commit import Output
    from illada_batch.job.records import RowRange
    from illada_batch.job.storage import filesystem

    (tmp_path / "_manifest").mkdir()
    old = {"shard_id": "abc-000000000", "data_key": "data/part-abc-000000000-1.parquet", "rows": 16,
           "sha256": "0" * 64, "fingerprint": "fp", "committed_at": 1.0, "samples": 16, "errors": 1, "tokens": 40,
           "gen_seconds": 0.5, "seconds": 1.0, "started": 0.5, "node": "n", "pid": 7}
    (tmp_path / "_manifest" / "abc-000000000.json").write_text(json.dumps(old))
    out = Output(*filesystem(str(tmp_path), {}))
    plan = {"abc-000000000": RowRange("in/a.parquet", 100, "1", 0, 8)}
    assert out.trusted_manifests("fp", plan, samples_per_row=2) == {}, "its data file is missing: not trusted"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-abc-000000000-1.parquet").write_bytes(b"x")  # no size recorded: only there
    (m,) = out.trusted_manifests("fp", plan, samples_per_row=2).values()
    assert (m.samples, m.stats.errors, m.stats.tokens, m.stats.pid, m.rows) == (16, 1, 40, 7, None)
    with pytest.raises(RowRangeMismatch, match="it holds 16 samples, the plan's shard 8"):
        out.trusted_manifests("fp", plan, samples_per_row=1)
