"""Checks made before any cluster work, by ``validate`` and by ``run``: is the model there,
can the output be written, can the cluster hold a replica. Each returns the problems it
found, one line each naming the field; an empty list means fine. Nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from illada_batch.errors import OutputError
from illada_batch.job.model_fit import (
    PAGE_TOKENS,
    context_problems,
    family_problems,
    fixed_text_problems,
    kv_budget_problems,
    tp_problems,
)
from illada_batch.job.spec import JobSpec
from illada_batch.job.storage import filesystem, is_transient, storage_errors

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"


def model_problems(spec: JobSpec, replicas_here: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes): a local ``model.path`` must be a shipped name or a directory holding
    a config.json; a remote one must hold config.json where this machine's credentials can
    look (a check it cannot make is a note, not a problem). ``replicas_here=False`` (a
    cluster given by address): a local path is the replicas' nodes' business, so what is
    missing here is only a note."""
    problems, notes = _model_problems(spec)
    if not problems:
        problems = model_fit_problems(spec)
    if not replicas_here and "://" not in spec.model.path:
        return [], notes + [f"{p} on this machine (the replicas' nodes may have it)" for p in problems]
    return problems, notes


def _model_problems(spec: JobSpec) -> tuple[list[str], list[str]]:
    path = spec.model.path
    if "://" in path and not path.startswith("file://"):
        try:
            fs, remote = filesystem(path, spec.model.storage_options)
            if not fs.exists(f"{remote.rstrip('/')}/config.json"):
                return [f"model.path: {path} holds no config.json (is it a model directory?)"], []
        except Exception as exc:  # noqa: BLE001 - network or credentials of any fsspec backend
            if is_transient(exc):
                return [f"model.path: {path} is unreachable ({type(exc).__name__}: {exc})"], []
            return [], [f"model.path: {path} not checked from here ({type(exc).__name__}: {exc})"]
        return [], []
    local = Path(spec.resolve(path.removeprefix("file://"))).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return [f"model.path: {local} holds no config.json (is it a model directory?)"], []
        return [], []
    if local_model_dir(spec) is not None:
        return [], []
    names = ", ".join(sorted(p.name for p in SHIPPED_MODELS.iterdir() if p.is_dir())) if SHIPPED_MODELS.is_dir() else ""
    return [f"model.path: {local} is no directory, and {path!r} is not a shipped model ({names or 'none'})"], []


def local_model_dir(spec: JobSpec) -> Path | None:
    """The model's directory on this machine (a local path or a shipped name), or None."""
    path = spec.model.path
    if "://" in path and not path.startswith("file://"):
        return None
    local = Path(spec.resolve(path.removeprefix("file://"))).expanduser()
    return local if local.is_dir() else SHIPPED_MODELS / path if (SHIPPED_MODELS / path).is_dir() else None


def model_fit_problems(spec: JobSpec) -> list[str]:
    """What the model's tokenizer and config.json, where this machine has them, say would fail
    every row or every replica (``job/model_fit.py``)."""
    from illada_batch.errors import ConfigError
    from illada_batch.model import registry
    from illada_batch.model.tokenizer import Tokenizer

    directory = local_model_dir(spec)
    if directory is None or not (directory / "tokenizer.json").is_file():
        return []
    tok = Tokenizer(directory)
    problems = fixed_text_problems(spec, tok)
    if spec.backend != "diffusion":
        return problems + tp_problems(spec, None)
    try:
        family, config = registry.parse(directory / "config.json")
        card = family.card(config)
    except ConfigError:
        return problems  # the replica's own load says what is wrong with it
    ranks = spec.engine.tensor_parallel_size
    bits = 32 if spec.model.dtype == "float32" or (spec.model.dtype == "auto" and not spec.resources.num_gpus) else 16
    page_bytes = PAGE_TOKENS * card.kv_bytes_per_token(bits // 8) // ranks  # a rank holds its own KV heads' pages
    return (problems + tp_problems(spec, registry.tp_problem(family, config, ranks))
            + family_problems(spec, card, registry.setting_owners())
            + context_problems(spec, tok, card.max_sequence_length)
            + kv_budget_problems(spec, page_bytes, card))


def model_card(spec: JobSpec):
    """The family card of the spec's diffusion model where this machine holds its config.json
    (a local path or a shipped name), else None (a model by URL, another backend, a config.json
    that does not parse: the replicas see those)."""
    from illada_batch.errors import UserError
    from illada_batch.model import registry

    directory = local_model_dir(spec)
    if spec.backend != "diffusion" or directory is None or not (directory / "config.json").is_file():
        return None
    try:
        return registry.card_of(directory)
    except UserError:
        return None


def cache_text(spec: JobSpec) -> str:
    """``engine.cache`` as the replicas run it (``auto -> prefix``), for the summary, the card
    and ``validate``; ``auto`` alone where the model is not seen here (``CacheMode.describe``)."""
    if spec.backend != "diffusion":
        return spec.engine.cache.value
    return spec.engine.cache.describe(model_card(spec))


def foreign_refusal(url: str, foreign: list[str]) -> str:
    """The one line that refuses an output holding files the job did not write."""
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return (f"output.url {url} holds files this job did not write ({shown}): refusing to write there, since "
            f"nothing of yours is ever overwritten or removed; choose an empty or new folder")


def foreign_problems(url: str, storage_options: dict) -> list[str]:
    """``validate``'s view of what ``run`` refuses before any work: an existing output folder
    holding files this job did not write."""
    from illada_batch.job.commit import Output

    fs, root = filesystem(url, storage_options)
    out = Output(fs, root)
    with storage_errors(f"output.url {url}", OutputError, "cannot read"):
        foreign = out.read_at_start()[2]
    return [foreign_refusal(url, foreign)] if foreign else []


def output_problems(url: str, storage_options: dict) -> list[str]:
    """Whether ``url`` could be written: locally, its nearest existing folder is a writable
    folder; on a store, its bucket (or top folder) can be listed."""
    if "://" not in url or url.startswith("file://"):
        target = Path(url.removeprefix("file://")).absolute()
        existing = next(p for p in (target, *target.parents) if p.exists())
        if not existing.is_dir():
            return [f"output.url: {url} cannot be created: {existing} is a file"]
        if not os.access(existing, os.W_OK | os.X_OK):
            return [f"output.url: {url} cannot be created: {existing} is not writable"]
        return []
    fs, path = filesystem(url, storage_options)
    top = path.split("/", 1)[0]
    try:
        with storage_errors(f"output.url {url}", OutputError, "cannot reach it"):
            try:
                fs.ls(top)  # raises on wrong credentials, where exists() would say False
            except FileNotFoundError:
                return [f"output.url {url}: no such bucket {top!r}"]
    except OutputError as exc:
        return [str(exc)]
    return []


def cluster_problems(spec: JobSpec, address: str) -> tuple[list[str], list[str]]:
    """(problems, notes) from asking the Ray cluster at ``address``: a replica no node can
    hold is a problem (an autoscaler might still add one: the note says what is there)."""
    import ray

    from illada_batch.job.pool import cluster_resources_text, resources_text

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    request = {k: v for k, v in {"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus}.items() if v}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def holds(node: dict) -> int:  # replicas this node can hold, counting only what a replica asks for
        return min(int(node.get(k, 0) // v) for k, v in request.items()) if request else spec.replica_range[1]

    fits = sum(holds(node) for node in nodes)
    notes = [f"cluster {address}: {cluster_resources_text()}, {len(nodes)} node(s)"]
    if fits == 0:
        return [f"resources: a replica asks for {resources_text(request)}, which no node of the cluster at "
                f"{address} has (unless an autoscaler adds one)"], notes
    lo, hi = spec.replica_range
    if fits < lo:
        notes.append(f"replicas: the cluster holds {fits} of the {lo} replicas now; the others wait "
                     f"up to placement_timeout_s ({spec.placement_timeout_s:g} s) for room, then are given up")
    elif fits < hi:
        notes.append(f"replicas: the cluster holds {fits} of up to {hi} replicas now; the others wait for it to grow")
    return [], notes
