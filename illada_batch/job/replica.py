"""The replica: a Ray actor holding one engine (one model copy on one device).

It builds its engine once (``start``, called by the driver as soon as Ray has placed the
actor, so that a placement that never happens and a model that cannot load are told
apart, and the model's own error reaches the driver), then for each shard the driver
hands it: reads the rows with pyarrow over fsspec (a filesystem made inside the actor),
renders the prompts, generates, writes the rows to an attempt-unique key and commits the
shard's manifest.

The engine is the job's backend behind one request API (``tokenizer``, ``run(requests)``):
the diffusion ``Engine``, or ``VLLMEngine`` (``backend: vllm``, imported only then). Everything else, from reading the shard to committing it, is the same code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import ray

from illada_batch.errors import CheckpointError, InputError, SpecError, StorageUnavailable
from illada_batch.job.commit import Output
from illada_batch.job.metrics import ReplicaMetrics
from illada_batch.job.model_fit import family_problems, fixed_text_problems
from illada_batch.job.records import Manifest, ShardStats
from illada_batch.job.rows import output_table, render_rows
from illada_batch.job.shards import Shard, read_shard
from illada_batch.job.spec import JobSpec
from illada_batch.job.storage import filesystem


class ShardError(RuntimeError):
    """The shard itself is bad (unreadable, wrong schema): retrying cannot help."""


def weights_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_cache_root() -> Path:
    """Where models given by URL are copied, once per node: ``$ILLADA_MODEL_CACHE``, or
    ``~/.cache/illada_batch/models``."""
    return Path(os.environ.get("ILLADA_MODEL_CACHE", Path.home() / ".cache/illada_batch/models"))


def fetch_model(spec: JobSpec) -> str:
    """A local directory for ``model.path``: shipped names and local paths as they are; URLs
    copied once per node into :func:`model_cache_root` (atomically, by rename) and checked
    against ``model.sha256`` (a mismatch is a ``CheckpointError``: no retry fixes it)."""
    path = spec.model.path
    if "://" not in path or path.startswith("file://"):
        local = spec.resolve(path.removeprefix("file://"))
        target = local if Path(local).is_dir() else path  # a shipped model name
    else:
        target_dir = model_cache_root() / hashlib.sha256(path.encode()).hexdigest()[:16]
        if not target_dir.exists():
            fs, remote = filesystem(path, spec.model.storage_options)
            tmp = target_dir.with_name(f"{target_dir.name}.tmp-{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for f in fs.ls(remote, detail=False):
                fs.get(f, str(tmp / f.rsplit("/", 1)[-1]))
            try:
                tmp.rename(target_dir)
            except OSError:  # another process on this node won the race
                shutil.rmtree(tmp, ignore_errors=True)
        target = str(target_dir)
    if spec.model.sha256:
        from illada_batch.model.checkpoint import resolve_model_path

        got = weights_sha256(resolve_model_path(target))
        if got != spec.model.sha256:
            raise CheckpointError(f"model {path}: weights sha256 {got} != model.sha256 {spec.model.sha256} in the job spec")
    return target


def build_engine(spec: JobSpec):
    """The job's backend: an object with ``tokenizer`` and ``run(requests) -> results`` (and
    optionally ``close()``)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(spec.resources.num_cpus)))
    e = spec.engine
    budget = e.budget()
    if spec.backend == "vllm":
        from illada_batch.engine.vllm_engine import VLLMEngine
        from illada_batch.model.checkpoint import resolve_model_path

        return VLLMEngine(resolve_model_path(fetch_model(spec)), prefix_cache=e.cache != "off",
                          max_batch_size=e.max_batch_size, kv_budget=budget, dtype=spec.model.dtype, seed=spec.seed)
    from illada_batch.engine.diffusion import Engine

    dtype = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec.model.dtype]
    if e.tensor_parallel_size > 1:
        from illada_batch.job.tp_ranks import start_ranks
        from illada_batch.model.checkpoint import resolve_model_path

        return start_ranks(str(resolve_model_path(fetch_model(spec))), e.tensor_parallel_size, spec.resources.num_cpus,
                           spec.resources.num_gpus, dtype,
                           dict(cache=e.cache, max_batch_size=e.max_batch_size, kv_budget=budget,
                                prefill_chunk=e.prefill_chunk))
    return Engine.from_pretrained(fetch_model(spec), cache=e.cache, dtype=dtype, max_batch_size=e.max_batch_size,
                                  kv_budget=budget, prefill_chunk=e.prefill_chunk)


class RowGenerator:
    """The engine side of a replica, built once: rows in (an Arrow table of input columns),
    output rows out (the job's output columns, one per (row, sample)). ``ShardReplica`` adds
    the shard's read and commit; ``job/ray_data.py`` maps Ray Data batches through it."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.engine = build_engine(self.spec)
        self._engine_lock = threading.Lock()
        self.tok = self.engine.tokenizer
        self.params = self.spec.sampling.params()
        prefix = self.spec.prefix_text()
        self.chat_wrap = None
        if self.spec.chat:
            sys_msgs = [{"role": "system", "content": prefix}] if prefix else []
            head = self.tok.apply_chat_template(sys_msgs, add_generation_prompt=False) if prefix else ""

            def chat_wrap(messages: list[dict]) -> str:
                full = self.tok.apply_chat_template(sys_msgs + messages, add_generation_prompt=True)
                return full[len(head):]

            self.chat_wrap, prefix = chat_wrap, head
        self.prefix_ids = tuple(self.tok.encode(prefix)) if prefix else ()
        problems = fixed_text_problems(self.spec, self.tok)  # a model given by URL is first seen here
        if problems:
            raise SpecError("; ".join(problems))
        card = getattr(getattr(self.engine, "model", None), "card", None)  # the diffusion engine's family card
        if card is not None:
            from illada_batch.model.registry import setting_owners

            problems = family_problems(self.spec, card, setting_owners())
            if problems:
                raise SpecError("; ".join(problems))
        self.model_name = self.spec.model.path if card is None else f"{card.family}:{self.spec.model.path}"

    def generate_rows(self, table: pa.Table, duplicates: tuple[tuple[int, str], ...] = ()) -> tuple[pa.Table, float]:
        """The output rows for ``table``'s rows, and the seconds the engine took."""
        from illada_batch.engine.requests import Request

        rows = render_rows(self.spec, table, self.chat_wrap, duplicates, self.tok.special_texts)
        requests, keys = [], []
        for i, row in enumerate(rows):
            if row.error is None:
                try:
                    prompt_ids = tuple(self.tok.encode(row.prompt))
                    template = row.response.tokenize(self.tok.encode) if row.response is not None else None
                except Exception as exc:  # noqa: BLE001 - nothing one row holds may fail its shard
                    row.error = f"cannot tokenize the row: {type(exc).__name__}: {exc}"
                    continue
                for j in range(self.spec.n):
                    requests.append(Request(str(row.row_id), prompt_ids, self.prefix_ids, self.params, j, self.spec.seed,
                                            template))
                    keys.append((i, j))
        with self._engine_lock:  # one shard generates while the other reads or writes
            t_gen = time.time()
            results = dict(zip(keys, self.engine.run(requests)))
            gen_seconds = time.time() - t_gen
        return output_table(self.spec, table, rows, results, self.model_name), gen_seconds

    def close(self) -> None:
        """Release the engine (vLLM's must be shut down before Ray is)."""
        close = getattr(self.engine, "close", None) if self.engine is not None else None
        if close is not None:
            close()


class ShardReplica(RowGenerator):
    """Plain class (testable without Ray); ``Replica`` below is its actor form."""

    def __init__(self, spec_json: str, output_url: str, fingerprint: str) -> None:
        # cheap on purpose: Ray reports the actor ready once placed; ``start`` loads the model
        self.spec = JobSpec.model_validate_json(spec_json)
        self.output_url, self.fingerprint = output_url, fingerprint
        self.engine = None
        self._start_lock = threading.Lock()

    def start(self) -> dict:
        """Build the engine (load or copy the model); its error, if any, is the model's own
        (``CheckpointError``, ``ConfigError``...), raised to the driver. Idempotent."""
        with self._start_lock:
            if self.engine is None:
                RowGenerator.__init__(self, self.spec)
                self.fs, self.in_root = filesystem(self.spec.input.url, self.spec.input.storage_options)
                self.out = Output(*filesystem(self.output_url, self.spec.output.storage_options))
                self.metrics = ReplicaMetrics(self.spec.name)
        return {"node": os.uname().nodename, "pid": os.getpid()}

    def process(self, shard_dict: dict) -> Manifest:
        t0 = time.time()
        self.start()
        shard = Shard.from_dict(shard_dict)
        try:
            table = read_shard(self.fs, shard, self.spec.input.columns())
        except StorageUnavailable:
            raise  # the store, not the shard: the driver retries it
        except InputError as exc:
            raise ShardError(str(exc)) from None
        out, gen_seconds = self.generate_rows(table, shard.duplicates)
        self.metrics.engine(self.engine)
        errors = sum(e is not None for e in out.column("error").to_pylist())
        tokens = sum(out.column("num_tokens").to_pylist())
        stats = ShardStats(out.num_rows, errors, tokens, gen_seconds, time.time() - t0, t0, os.uname().nodename,
                           os.getpid())
        return self.out.write_shard(shard.shard_id, shard.row_range(), out, self.fingerprint, stats,
                                    duplicate_rows=[k for k, _ in shard.duplicates])


# Two calls at once: the driver keeps two shards in flight per replica, so the next shard's
# read and render, and the last one's write and commit, overlap the engine's work.
Replica = ray.remote(max_concurrency=2)(ShardReplica)
