"""A Ray Data entry point: map a ``ray.data.Dataset`` of prompts through replicas of the
engine, the way ``ray.data.llm`` does for vLLM.

    ds = ray.data.read_parquet("s3://bucket/prompts/")
    out = generate_dataset(ds, model={"path": "tiny-llada"}, sampling={"steps": 32, "gen_length": 32},
                           prefix={"text": few_shot}, n=2, replicas=4, resources={"num_gpus": 1})
    out.write_parquet("s3://bucket/generations/")

The options are the job spec's own fields and types (``job/spec.py``: ``model``,
``input`` without ``url``, ``prefix``, ``template``, ``response_template``, ``chat``, ``sampling``, ``engine``,
``n``, ``seed``, ``backend``; ``replicas`` is Ray Data's ``concurrency`` and ``resources``
each replica's CPUs and GPUs), validated the same way, with the same messages (``engine.cache``
defaults to ``auto``: LLaDA 2.x runs on its exact block-causal cache). Each replica is
a ``RowGenerator`` (``job/replica.py``), built once per actor (the model loaded once), so a
row's output columns, error rows and seeds are exactly a job's.

Where it differs from ``illada-batch run``: there is no exactly-once commit, manifest or
resume (Ray Data's writes are not atomic, a failed pipeline starts over), no duplicate-id
pass across batches (a repeated id in another batch is generated again, with the same seed
and so the same tokens), and no ``_SUCCESS.json`` or error budget. The job path stays the
one for nightly runs.
"""

from __future__ import annotations

import warnings

from pydantic import BaseModel

from illada_batch.errors import InputError, SpecError
from illada_batch.job.replica import RowGenerator
from illada_batch.job.spec import JobSpec, spec_from_dict

# the job spec's fields that mean something here; output, sharding and retry fields do not
FIELDS = ("backend", "model", "input", "prefix", "template", "response_template", "chat", "sampling", "engine", "n",
          "seed", "replicas", "resources")
SOURCE = "generate_dataset()"


def dataset_spec(**fields) -> JobSpec:
    """The ``JobSpec`` these options make (absolute local paths), or SpecError naming the field."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise SpecError(f"{SOURCE}: {', '.join(unknown)}: not an option here (it has {', '.join(FIELDS)})")
    raw = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}
    if "url" in raw.get("input", {}):
        raise SpecError(f"{SOURCE}: input.url: the dataset is the input; give only its columns")
    raw["input"] = {**raw.get("input", {}), "url": "ray-data://dataset"}
    return spec_from_dict({"name": "ray-data", **raw}, source=SOURCE).resolved()


class DatasetReplica(RowGenerator):
    """One replica of the engine as a Ray Data callable class: built once per actor, then
    called with each batch (an Arrow table) of input rows."""

    def __init__(self, spec_json: str) -> None:
        super().__init__(JobSpec.model_validate_json(spec_json))

    def __call__(self, batch):
        missing = [c for c in self.spec.input.columns() if c not in batch.column_names]
        if missing:
            raise InputError(f"the dataset has no column(s) {', '.join(missing)} (has {', '.join(batch.column_names)})")
        return self.generate_rows(batch)[0]


def generate_dataset(ds, batch_size: int = 64, **fields):
    """``ds`` (a ``ray.data.Dataset`` with the id and prompt columns) mapped to the job's output
    columns, one row per (row, sample). Lazy, like every Ray Data transform: nothing runs
    until the result is consumed (``write_parquet``, ``take``, ``iter_batches``).
    ``batch_size``: rows handed to a replica per call; the engine batches inside it
    (``engine.max_batch_size``), so larger only means fewer, longer calls."""
    spec = dataset_spec(**fields)
    _refuse_if_no_node_fits(spec)
    _warn_if_no_cpu_left(spec)
    threads = str(max(1, int(spec.resources.num_cpus)))
    env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads,
                        "TOKENIZERS_PARALLELISM": "false"}}
    return ds.map_batches(DatasetReplica, fn_constructor_args=(spec.model_dump_json(),), batch_format="pyarrow",
                          batch_size=batch_size, concurrency=_concurrency(spec), num_cpus=spec.resources.num_cpus,
                          num_gpus=spec.resources.num_gpus, runtime_env=env)


def _concurrency(spec: JobSpec) -> int | tuple[int, int]:
    """Ray Data's ``concurrency``: a fixed pool, or (min, max) for an autoscaling one."""
    lo, hi = spec.replica_range
    return lo if lo == hi else (lo, hi)


def _refuse_if_no_node_fits(spec: JobSpec) -> None:
    """A replica no node can hold would wait forever (Ray Data waits for actors in silence):
    refuse it at once, as a job does, on a Ray this process runs (``RAY_ADDRESS`` unset; a
    cluster given by address may autoscale)."""
    import os

    import ray

    from illada_batch.job.pool import check_fits

    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_fits({"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus})


def _warn_if_no_cpu_left(spec: JobSpec) -> None:
    """Replicas holding every CPU of the cluster leave none for Ray Data's read and write
    tasks, and the pipeline waits forever; say so (a warning: an autoscaling cluster may
    grow)."""
    import ray

    if not ray.is_initialized() or spec.resources.num_gpus > 0:
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    held = spec.replica_range[1] * spec.resources.num_cpus
    if held >= cpus:
        warnings.warn(f"{SOURCE}: {spec.replica_range[1]} replica(s) x resources.num_cpus {spec.resources.num_cpus} = "
                      f"{held:g} CPUs, every CPU of the cluster ({cpus:g}): Ray Data's read and write tasks would "
                      f"wait for a CPU forever; use fewer replicas or a fraction of a CPU each", stacklevel=3)
