"""Load and save checkpoints of any registered family: a Hugging Face-style directory with ``config.json``,
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``),
``tokenizer.json`` and ``tokenizer_config.json``.

The family comes from ``registry.family_of(config.json)``. safetensors only: nothing is ever
unpickled. Loading streams tensor by tensor into the family's model built on the meta device, so peak memory is about one model copy. Missing, unexpected or
mis-shaped tensors are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from illada_batch.errors import CheckpointError, ConfigError
from illada_batch.model import registry
from illada_batch.model.base import DiffusionLM
from illada_batch.model.family import tp_problem
from illada_batch.model.layers.linear import TPGroup
from illada_batch.model.tokenizer import Tokenizer

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # the shipped models
INDEX_NAME = "model.safetensors.index.json"


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A directory path, or the name of a model shipped in the package (e.g. ``tiny-llada``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    shipped = MODELS_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    names = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
    raise CheckpointError(f"model {str(name_or_path)!r}: no such directory, and not a shipped model ({', '.join(names) or 'none'})")


def _weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file that holds it."""
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {name: directory / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    single = directory / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {', '.join(found)}: pickled weights are never loaded; convert to safetensors)" if found else ""
        raise CheckpointError(f"{directory}: no model.safetensors or {INDEX_NAME}{hint}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_model(name_or_path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, tp: TPGroup | None = None) -> DiffusionLM:
    """Load a checkpoint of any registered family; ``model.config``, ``model.card`` and
    ``model.tokenizer`` come with it.

    device defaults to CUDA when available; dtype to bfloat16 on CUDA and float32 on CPU.
    ``tp``: load this rank's shard of a tensor-parallel replica: each split tensor is read as
    its slice only (``safe_open(...).get_slice``), never whole. Every weight is the process's
    own memory (copied out of the file's mapping on CPU), so memory measured is memory held.
    """
    directory = resolve_model_path(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        family, cfg = registry.parse(directory / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if tp is not None:
        problem = tp_problem(family, cfg, tp.size)
        if problem:
            raise CheckpointError(f"{directory}: {problem}")
    with torch.device("meta"):
        model = registry.model_class(family)(cfg) if tp is None else registry.model_class(family)(cfg, tp=tp)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    files = _weight_files(directory)
    unexpected = sorted(set(files) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              f"{' ...' if len(unexpected) > 5 else ''} (not part of a {family.name} model with this config)")
    missing = sorted(set(expected) - set(files))
    if missing:
        shown = ", ".join(f"{name} {expected[name]}" for name in missing[:5])
        raise CheckpointError(f"{directory}: missing tensor(s) {shown}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device=str(device) if device.type != "cpu" else "cpu") as handle:
            absent = sorted(set(names) - set(handle.keys()))
            if absent:
                raise CheckpointError(f"{f.name}: the index says it holds {', '.join(absent[:5])}, but it does not")
            for name in names:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                tensor = _read(handle, name, module, expected[name], f.name)
                # copied out of the file's mapping on CPU, as a GPU load copies to the device: a
                # weight left file-backed counts toward memory only once read, and is dropped and
                # read again from disk under memory pressure
                owned = tensor.to(device=device, dtype=dtype, copy=device.type == "cpu")
                setattr(module, attr, torch.nn.Parameter(owned, requires_grad=False))
                del tensor
    model.eval()
    if (directory / "tokenizer.json").exists():
        model.tokenizer = Tokenizer(directory)
    model.name_or_path = str(directory)
    return model


def _read(handle, name: str, module: torch.nn.Module, expected: tuple[int, ...], fname: str) -> torch.Tensor:
    """The tensor ``name``, or only this rank's slice of it when ``module`` is split
    (``layers/linear.py``: ``tp_dim``, ``tp_range``, ``full_shape``)."""
    full = getattr(module, "full_shape", None)
    bias = name.endswith(".bias")
    if full is None or (bias and module.tp_dim == 1):  # whole, or a row-parallel bias (on every rank)
        tensor = handle.get_tensor(name)
        shape, implied = tuple(tensor.shape), expected
    else:
        piece = handle.get_slice(name)
        shape, implied = tuple(piece.get_shape()), tuple(full[:1] if bias else full)
        ranges = getattr(module, "tp_pieces", None) or [module.tp_range]  # a fused layer's parts, in order
        parts = [piece[start:stop] if module.tp_dim == 0 or bias else piece[:, start:stop] for start, stop in ranges]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
    if shape != implied:
        raise CheckpointError(f"{fname}: tensor {name} has shape {shape}, config.json implies {implied}")
    return tensor


def save_checkpoint(model: DiffusionLM, directory: str | Path, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and safetensors weights (sharded when ``max_shard_bytes`` is set)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory
