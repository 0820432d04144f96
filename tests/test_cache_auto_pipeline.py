"""The job and Ray Data paths run LLaDA 2.x (the tiny checkpoint) on its exact block-causal
cache by default (``engine.cache: auto``), on a real local Ray: the replicas' engine resolves
auto from the family card, the summary and card say so, the tokens are the cache-off
engine's, and a resume with the default spec trusts the output it wrote."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pytest
from pipeline_support import assert_exactly_once, job_dict, read_output, write_prompts

from illada_batch.decoding.params import SamplingParams
from illada_batch.errors import FingerprintMismatch
from illada_batch.job.spec import spec_from_dict

SAMPLING = {"steps": 8, "gen_length": 16, "block_length": 8}
PREFIX = "Task: Write the same words in reverse order.\n\nInput: lamb king bread\nOutput: bread king lamb\n\n"
WORDS = "lamb king bread water stone fire tree gold light house".split()
IDS = [f"r{i}" for i in range(10)]
PROMPTS = [f"Input: {WORDS[i]} {WORDS[(i * 3 + 1) % 10]}\nOutput:" for i in range(10)]
EXACT = "auto -> blocks (exact block-causal cache)"


@pytest.fixture(scope="module")
def llada2(family_checkpoint):
    return str(family_checkpoint("llada2"))


def _cache_off_texts(llada2: str, seed: int) -> dict[str, str]:
    from illada_batch.engine.diffusion import Engine

    engine = Engine.from_pretrained(llada2, cache="off", max_batch_size=8)
    got = engine.generate(PROMPTS, SamplingParams(**SAMPLING), prefix=PREFIX, seed=seed, request_ids=IDS)
    return {r.request_id: r.text for r in got}


@pytest.mark.slow
def test_a_job_runs_llada2_on_the_exact_cache_by_default_and_resumes(ray_cluster, llada2, tmp_path):
    from illada_batch.job.driver import run_job

    fs = fsspec.filesystem("file")
    write_prompts(fs, str(tmp_path / "in.parquet"), IDS, PROMPTS)
    raw = job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), None, model__path=llada2,
                   sampling=SAMPLING, engine={"max_batch_size": 8})
    spec = spec_from_dict(raw)
    assert spec.engine.cache.value == "auto"
    summary = run_job(spec, show_progress=False, log=lambda *_: None)
    assert summary.exit_code() == 0 and summary.cache == EXACT
    assert f"| engine.cache | {EXACT} |" in (tmp_path / "out" / "README.md").read_text()
    table = read_output(fs, str(tmp_path / "out"))
    assert_exactly_once(table, IDS, 1)
    got = dict(zip(table.column("id").to_pylist(), table.column("generation").to_pylist()))
    assert got == _cache_off_texts(llada2, spec.seed) and len(set(got.values())) > 5  # not one text for all

    again = run_job(spec_from_dict(raw), show_progress=False, log=lambda *_: None)  # the default again: trusted
    assert again.this_run.shards == 0 and again.shards_committed == summary.shards_committed
    explicit = spec_from_dict({**raw, "engine": {"cache": "blocks", "max_batch_size": 8}})
    with pytest.raises(FingerprintMismatch, match="fingerprint"):  # the spec's value is recorded, not the resolved one
        run_job(explicit, show_progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_ray_data_runs_llada2_on_the_exact_cache_by_default(ray_cluster, llada2):
    import ray

    from illada_batch.job.ray_data import DatasetReplica, dataset_spec, generate_dataset

    options = dict(model={"path": llada2}, sampling=SAMPLING, prefix={"text": PREFIX}, seed=3,
                   engine={"max_batch_size": 8})
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in zip(IDS, PROMPTS)])
    rows = generate_dataset(ds, replicas=1, resources={"num_cpus": 0.5}, **options).take_all()
    assert {r["id"]: r["generation"] for r in rows} == _cache_off_texts(llada2, 3)
    assert all(r["error"] is None for r in rows) and len(rows) == len(IDS)

    replica = DatasetReplica(dataset_spec(**options).model_dump_json())  # what each Ray Data actor builds
    replica(pa.table({"id": IDS, "prompt": PROMPTS}))
    engine = replica.engine
    assert engine.cache_text == EXACT and engine.block_causal
    assert engine.counters.prefix_pages_read > 0  # rows read their complete prompt blocks' pages
