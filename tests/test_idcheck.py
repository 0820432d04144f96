"""The bounded-memory duplicate-id check (job/idcheck.py) gives the same shards, repeats and
messages as the in-memory one (shards.mark_duplicate_ids), whatever the ids, their types,
nulls, files and sharding, and which shards are already committed in the output (their ids
claim first, but for the rows their manifest lists in ``duplicate_rows``); with buckets of a
few ids, so that every input spans many."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.job.idcheck import mark_duplicate_ids_bounded
from illada_batch.job.records import Manifest, ShardStats
from illada_batch.job.shards import mark_duplicate_ids, plan_shards

TEXT = st.sampled_from(["a", "b", "c", "1", "2", ""])
ids_of_a_file = st.one_of(  # integers, text, or (in JSON Lines) both: 7 and "7" are one id
    st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=1, max_size=12),
    st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=12),
    st.lists(st.one_of(st.none(), st.integers(0, 6), TEXT), min_size=1, max_size=12))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(ids_of_a_file, st.booleans()), min_size=1, max_size=4),
       shard_rows=st.integers(1, 5), bucket_ids=st.integers(1, 8), data=st.data())
def test_bounded_check_matches_the_in_memory_one(tmp_path, files, shard_rows, bucket_ids, data):
    root = tmp_path / uuid.uuid4().hex[:8]
    (root / "sub").mkdir(parents=True)
    for i, (ids, jsonl) in enumerate(files):
        prompts = [f"p{k}" for k in range(len(ids))]
        if jsonl and not all(x is None for x in ids):
            with open(root / "sub" / f"f{i}.jsonl", "w") as f:
                f.writelines(json.dumps({"id": x, "prompt": p}) + "\n" for x, p in zip(ids, prompts))
        else:
            typ = pa.int64() if all(x is None or isinstance(x, int) for x in ids) and \
                any(isinstance(x, int) for x in ids) else pa.string()
            ids = [None if x is None else x if typ == pa.int64() else str(x) for x in ids]
            pq.write_table(pa.table({"id": pa.array(ids, typ), "prompt": prompts}), root / f"f{i}.parquet",
                           row_group_size=3)
    shards, _ = plan_shards(str(root), {}, shard_rows, ["id", "prompt"], "id", "prompt")
    if not shards:
        return
    committed = {}
    for s in data.draw(st.lists(st.sampled_from(shards), unique_by=lambda s: s.shard_id), label="committed"):
        skip = data.draw(st.sets(st.integers(0, s.num_rows - 1)), label=f"duplicate_rows of {s.shard_id}")
        committed[s.shard_id] = manifest(s.shard_id, tuple(sorted(skip)))
    want = mark_duplicate_ids(str(root), {}, shards, "id", committed=committed)
    got = mark_duplicate_ids_bounded(str(root), {}, shards, "id", scratch=str(tmp_path), bucket_ids=bucket_ids,
                                     committed=committed)
    assert got == want


def manifest(shard_id: str, duplicate_rows: tuple[int, ...]) -> Manifest:
    """A committed shard's manifest: only its id and ``duplicate_rows`` matter to the check."""
    return Manifest(shard_id, f"data/part-{shard_id}-0.parquet", 0, "", "fp", 0.0, None,
                    ShardStats(0, 0, 0, 0.0, 0.0, 0.0, "node", 0), duplicate_rows=duplicate_rows)
