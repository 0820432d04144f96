"""The manifest index (job/manifest_index.py) on a real S3 server: whatever the index holds
(stale, partial, or segments from a run whose shards were redone since), a reader gets
exactly the manifests the output holds; and ``status`` read twice in one process sees a
summary written in between."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.job.commit import Output
from illada_batch.job.driver import status
from illada_batch.job.manifest_index import IndexWriter, read_manifests
from illada_batch.job.records import JobSummary, Manifest, RowRange, ShardCounts, ShardStats
from illada_batch.job.shards import Shard
from illada_batch.job.storage import filesystem


def _commit(out: Output, sid: str):
    table = pa.table({"id": [sid], "sample_index": [0]})
    stats = ShardStats(1, 0, 1, 0.0, 0.0, 0.0, "node", 1)
    return out.write_shard(sid, RowRange("in.parquet", 10, "v", int(sid[1:]), 1), table, "fp", stats)


def _truth(fs, root: str) -> dict:
    """Every manifest file read one by one: what the output holds."""
    fs.invalidate_cache()
    return {json.loads(fs.cat_file(f))["shard_id"]: json.loads(fs.cat_file(f))
            for f in fs.ls(f"{root}/_manifest", detail=False)}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["commit", "index", "flush", "redo"]), st.integers(0, 5)),
                min_size=1, max_size=14))
def test_a_reader_gets_the_manifests_the_output_holds_whatever_the_index_says(s3, steps):
    fs, root = filesystem(f"s3://bucket/idx-{uuid.uuid4().hex[:8]}", s3.options)
    out = Output(fs, root)
    index = IndexWriter(out)
    latest = {}
    for op, k in steps:
        sid = f"s{k}"
        if op in ("commit", "redo") or sid not in latest:  # redo: a later attempt rewrites the manifest
            latest[sid] = _commit(out, sid)
        if op == "index":
            index.add(latest[sid])
        if op in ("flush", "redo"):
            index.flush()
    fs.invalidate_cache()
    got = {sid: json.loads(m.to_json()) for sid, m in read_manifests(fs, root)[0].items()}
    assert got == _truth(fs, root)


def test_indexed_manifests_need_no_reads_of_their_own(s3):
    fs, root = filesystem(f"s3://bucket/idx-{uuid.uuid4().hex[:8]}", s3.options)
    out = Output(fs, root)
    index = IndexWriter(out)
    for k in range(5):
        index.add(_commit(out, f"s{k}"))
    index.flush()
    _commit(out, "s5")  # committed after the last segment: read itself
    for f in fs.ls(f"{root}/_manifest", detail=True):  # the listing's ETag is the body's MD5 that the index checks
        assert f["ETag"].strip('"') == hashlib.md5(fs.cat_file(f["name"])).hexdigest()
    assert sorted(read_manifests(fs, root)[0]) == [f"s{k}" for k in range(6)]


def test_status_twice_in_one_process_sees_a_summary_written_in_between(s3):
    url = f"s3://bucket/st-{uuid.uuid4().hex[:8]}"
    fs, root = filesystem(url, s3.options)  # the process's one cached filesystem for these options
    out = Output(fs, root)
    _commit(out, "s0")
    assert status(url, s3.options).shards is None  # no summary yet: read from the manifests
    fs.ls(root)  # a listing of the output, cached (a notebook looking at it, say)
    writer = Output(s3.fs(), root)  # the run that finishes: another process, another filesystem
    writer.write_summary(JobSummary(output=url, job="t", fingerprint="fp", shards=1, shards_committed=1, samples=1), None)
    assert status(url, s3.options).job == "t"


def test_a_reader_hands_back_what_it_read_outside_the_index_so_a_resume_compacts_it(s3):
    fs, root = filesystem(f"s3://bucket/idx-{uuid.uuid4().hex[:8]}", s3.options)
    out = Output(fs, root)
    index = IndexWriter(out)
    index.add(_commit(out, "s0"))
    index.flush()
    _commit(out, "s1")
    _commit(out, "s2")  # a crashed run: committed, never indexed
    out.manifests()
    assert sorted(m.shard_id for m in out.unindexed) == ["s1", "s2"]
    index.add_all(out.unindexed)
    assert sorted(out.manifests()) == ["s0", "s1", "s2"] and out.unindexed == []


_text = st.text(max_size=12)


def _flat(keys):
    return st.lists(st.tuples(keys, st.integers(0, 10**6)), max_size=4).map(lambda kv: tuple(x for p in kv for x in p))


def _pairs(flat) -> str:
    return " ".join(f"{k}:{v}" for k, v in zip(flat[::2], flat[1::2]))


_manifests = st.builds(
    Manifest, _text, _text, st.integers(0, 10**6), _text, _text, st.floats(allow_nan=False),
    st.none() | st.builds(RowRange, _text, st.integers(0, 10**9), st.none() | _text, st.integers(0, 10**6),
                          st.integers(0, 10**6)),
    st.builds(ShardStats, st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
              st.floats(allow_nan=False), st.floats(allow_nan=False), st.floats(allow_nan=False), _text,
              st.integers(0, 10**6)),
    st.none() | st.integers(0, 10**9), st.none() | _text, st.lists(st.integers(0, 10**6), max_size=4).map(tuple),
    st.none() | st.builds(ShardCounts, _flat(st.integers(0, 10**4)).map(_pairs), _flat(_text), _flat(_text)))


@given(_manifests)
def test_a_manifests_bytes_are_its_fields_as_json_and_read_back_to_it(m):
    """The index trusts an entry by the MD5 of the manifest's bytes: the driver's encoding of a
    manifest it received is the replica's, byte for byte, and reads back to the same manifest."""
    assert m.to_json() == json.dumps(asdict(m)).encode()
    assert Manifest.from_json(json.loads(m.to_json())) == m


def test_a_resumes_start_lists_each_of_its_folders_once_and_at_once(s3, monkeypatch):
    """What the driver does before its first shard (``read_at_start``: manifests, foreign
    files; then ``damaged``) asks the store for one listing of ``_manifest/``, ``data/`` and
    ``_attempts/`` each, the three at once: at 10^5 shards a listing is a hundred requests
    and 10^5 entries parsed."""
    fs, root = filesystem(f"s3://bucket/idx-{uuid.uuid4().hex[:8]}", s3.options)
    out = Output(fs, root)
    for k in range(3):
        _commit(out, f"s{k}")
    listed, going, most, iterdir = [], set(), [0], fs._iterdir

    async def counting(bucket, max_items=None, delimiter="/", prefix="", versions=False):
        name = prefix.rstrip("/").rsplit("/", 1)[-1]
        listed.append(name)
        going.add(name)
        async for entry in iterdir(bucket, max_items, delimiter, prefix, versions):
            most[0] = max(most[0], len(going))
            yield entry
        going.discard(name)

    monkeypatch.setattr(fs, "_iterdir", counting)
    manifests, unreadable, foreign = out.read_at_start()
    assert foreign == [] and out.untrusted(manifests, unreadable) == {} and sorted(manifests) == ["s0", "s1", "s2"]
    assert sorted(k for k in listed if k in ("_manifest", "data", "_attempts")) == ["_attempts", "_manifest", "data"]
    assert most[0] == 3  # all three listings were under way together


def test_a_manifest_outside_the_index_costs_one_get(s3, monkeypatch):
    """Manifests the index does not hold are read in one GET each, with no HEAD before it
    (s3fs asks a file's size first unless told to read it whole): a resume after a crash reads
    up to a segment's worth of them."""
    fs, root = filesystem(f"s3://bucket/idx-{uuid.uuid4().hex[:8]}", s3.options)
    out = Output(fs, root)
    for k in range(3):
        _commit(out, f"s{k}")
    calls, call = [], fs._call_s3

    async def counting(method, *args, **kwargs):
        calls.append(method)
        return await call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", counting)
    assert sorted(out.read_manifests()[0]) == ["s0", "s1", "s2"]
    assert sorted(c for c in calls if c != "list_objects_v2") == ["get_object"] * 3


@given(st.builds(Shard, _text, _text, st.integers(0, 10**9), st.integers(0, 10**6), st.integers(0, 10**9),
                 st.none() | _text, st.lists(st.tuples(st.integers(0, 10**6), _text), max_size=3).map(tuple)))
def test_a_shard_sent_to_a_replica_is_its_fields_and_reads_back_to_it(shard):
    """The driver sends each shard as ``to_dict()`` (one per shard: no deep copies); a replica
    rebuilds the same shard from it."""
    assert shard.to_dict() == asdict(shard)
    assert Shard.from_dict(shard.to_dict()) == shard
