"""The Ray Data entry point on local Ray with the shipped model: a dataset of prompts in,
the same generations as ``Engine.generate`` with the same seeds out, in the job's columns."""

from __future__ import annotations

import pytest

from illada_batch.errors import SpecError
from illada_batch.job.ray_data import dataset_spec, generate_dataset
from illada_batch.job.rows import OUTPUT_SCHEMA

WORDS = "lamb king bread water stone fire tree gold light house".split()
PREFIX = "Task: Write the same words in reverse order.\n\nInput: lamb king bread\nOutput: bread king lamb\n\n"
SAMPLING = {"steps": 4, "gen_length": 8, "block_length": 8, "temperature": 0.8}


def test_options_are_the_job_specs_fields_checked_the_same_way():
    spec = dataset_spec(sampling=SAMPLING, n=2, seed=3, replicas=2)
    assert (spec.n, spec.seed, spec.replicas, spec.sampling.temperature) == (2, 3, 2, 0.8)
    with pytest.raises(SpecError, match=r"sampling.gen_length"):
        dataset_spec(sampling={"gen_length": 0})
    with pytest.raises(SpecError, match=r"shard_rows: not an option here"):
        dataset_spec(shard_rows=8)
    with pytest.raises(SpecError, match=r"input.url: the dataset is the input"):
        dataset_spec(input={"url": "x.parquet"})


@pytest.mark.slow
def test_a_dataset_of_100_prompts_gives_the_engines_generations(ray_cluster):
    import ray

    from illada_batch.decoding.params import SamplingParams
    from illada_batch.engine.diffusion import Engine

    ids = [f"p{i:03d}" for i in range(100)]
    prompts = [f"Input: {WORDS[i % 10]} {WORDS[(i * 3 + 1) % 10]} {WORDS[(i * 7 + 2) % 10]}\nOutput:" for i in range(100)]
    prompts[17] = None  # a bad row: an error row, in the output like a job's
    ds = ray.data.from_items([{"id": i, "prompt": p, "topic": i[-1]} for i, p in zip(ids, prompts)])
    out = generate_dataset(ds, batch_size=25, sampling=SAMPLING, prefix={"text": PREFIX}, n=2, seed=5,
                           replicas=2, resources={"num_cpus": 0.5}, input={"passthrough": ["topic"]},
                           engine={"max_batch_size": 16})
    rows = out.take_all()
    with pytest.warns(UserWarning, match=r"every CPU of the cluster \(2\)"):  # 2 x 1 CPU: reads would wait forever
        generate_dataset(ds, replicas=2, resources={"num_cpus": 1})
    assert set(rows[0]) == {"id", *OUTPUT_SCHEMA.names, "topic"}
    got = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(rows) == len(got) == 200

    engine = Engine.from_pretrained("tiny-llada", cache="prefix", max_batch_size=16)
    good = [i for i in range(100) if prompts[i] is not None]
    want = engine.generate([prompts[i] for i in good], SamplingParams(**SAMPLING), prefix=PREFIX, n=2, seed=5,
                           request_ids=[ids[i] for i in good])
    for res in want:
        row = got[(res.request_id, res.sample_index)]
        assert (row["generation"], row["seed"], row["num_tokens"]) == (res.text, res.seed, len(res.token_ids)), row
        assert row["topic"] == res.request_id[-1] and row["error"] is None
    assert len({got[(ids[i], 0)]["generation"] for i in good}) > 10  # not one text for every row
    assert got[("p017", 0)]["error"] == got[("p017", 1)]["error"] == "prompt is null"


@pytest.mark.slow
def test_a_replica_no_node_can_hold_is_refused_at_once(ray_cluster):
    """Before: the pipeline waited for the replica's actor forever, saying nothing."""
    import ray

    from illada_batch.errors import ClusterError

    ds = ray.data.from_items([{"id": "a", "prompt": "Input: lamb\nOutput:"}])
    with pytest.raises(ClusterError, match="a replica asks for 1 CPU, 1 GPU, which no node of this cluster has"):
        generate_dataset(ds, sampling=SAMPLING, resources={"num_gpus": 1})
    with pytest.raises(ClusterError, match="a replica asks for 3 CPU, which no node"):
        generate_dataset(ds, sampling=SAMPLING, resources={"num_cpus": 3})
