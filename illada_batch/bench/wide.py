"""``illada-batch bench --only wide``: real widths on a CPU, a few layers deep. LLaDA-8B
(d_model 4096, 32 heads, MLP 12,288, vocabulary 126,464; 4 layers) and LLaDA-MoE-7B-A1B
(hidden 2048, 64 experts top-8 of 1024, vocabulary 157,184; 2 layers, every one MoE): a
random checkpoint of each family's preset, bf16, written shard by shard as safetensors with
an index (never whole in memory), loaded streamed; then a few steps in each cache mode on 2
rows (128-token shared prefix, 32-token prompts, gen_length 32 in 4 steps). Reports the peak RSS over the weights' size, whether
every logit was finite, and the most positions any forward computed full-vocabulary logits
for (a step needs only the current block's)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from illada_batch.bench.families import refusal
from illada_batch.bench.measure import peak_bytes, peak_reset
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.checkpoint import INDEX_NAME, load_model
from illada_batch.model.registry import model_class

# shape -> (the family preset it takes its width from, the layers kept)
SHAPES = {"llada-8b": ("llada-8b", 4), "llada-moe": ("llada-moe", 2)}


def shallow(shape: str, layers: int):
    """(family, the preset's config with only ``layers`` layers)."""
    from illada_batch.bench.shape import shapes

    family, cfg = shapes()[shape]
    raw = cfg.to_dict()
    depth = "n_layers" if "n_layers" in raw else "num_hidden_layers"
    raw[depth] = layers
    if "moe_layer_freq" in raw:
        raw["moe_layer_freq"] = raw["moe_layer_freq"][:layers]
    return family, family.config(raw, f"{shape} preset")


def write_random_checkpoint(family, cfg, directory: Path, shard_bytes: int = 2**30) -> int:
    """Random bf16 weights (std 0.02, norms 1), one tensor at a time, under the family's own
    tensor names; -> total bytes."""
    with torch.device("meta"):
        names = {k: v.shape for k, v in model_class(family)(cfg).named_parameters()}
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    g = torch.Generator().manual_seed(0)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush() -> None:
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in shard})
        shard.clear()

    for name, shape in names.items():
        t = torch.ones(shape) if name.endswith("weight") and len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
            size = 0
        shard[name], size, total = t, size + t.numel() * 2, total + t.numel() * 2
    flush()
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def bench_wide(caches: list[str], shape: str = "llada-8b", layers: int | None = None) -> dict:
    layers = layers or SHAPES[shape][1]
    family, cfg = shallow(SHAPES[shape][0], layers)
    tmp = Path(tempfile.mkdtemp(prefix="illada-wide-"))
    try:
        weights = write_random_checkpoint(family, cfg, tmp)
        peak_reset()
        t0 = time.perf_counter()
        model = load_model(tmp, device="cpu", dtype=torch.bfloat16)
        out = {"shape": shape, "family": family.name, "layers": layers, "weights_gb": weights / 1e9,
               "parameters": model.card.parameters, "active_parameters": model.card.active_parameters,
               "load_s": time.perf_counter() - t0, "load_peak_over_weights": peak_bytes() / weights, "modes": {},
               "refused": {}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seen = {"finite": True, "max_positions": 0}
    head = model.logits

    def logits(hidden):
        z = head(hidden)
        seen["finite"] &= bool(torch.isfinite(z).all())
        seen["max_positions"] = max(seen["max_positions"], z.shape[-2])
        return z

    model.logits = logits
    g, V = torch.Generator().manual_seed(1), model.card.vocab_size
    prefix = tuple(torch.randint(0, V - 1000, (128,), generator=g).tolist())
    params = SamplingParams(steps=4, gen_length=32, block_length=32, early_stop=False)
    reqs = [Request(str(i), tuple(torch.randint(0, V - 1000, (32,), generator=g).tolist()), prefix,
                    params) for i in range(2)]
    for cache in caches:
        why = refusal(model, cache)
        if why is not None:
            out["refused"][cache] = why
            continue
        seen.update(finite=True, max_positions=0)
        t0 = time.perf_counter()
        Engine(model, cache=cache, max_batch_size=2).run(reqs)
        out["modes"][cache] = {"seconds": time.perf_counter() - t0, "peak_over_weights": peak_bytes() / weights,
                               "finite_logits": seen["finite"], "max_logit_positions_per_row": seen["max_positions"]}
    return out


def report(r: dict) -> str:
    lines = [f"{r['shape']} width ({r['family']}, {r['parameters'] / 1e9:.2f}B parameters, "
             f"{r['active_parameters'] / 1e9:.2f}B active), {r['layers']} layers, bf16 random weights "
             f"({r['weights_gb']:.2f} GB, sharded): "
             f"streamed load {r['load_s']:.1f} s, RSS after it {r['load_peak_over_weights']:.2f}x the weights "
             f"(pages not yet read)"]
    for cache, m in r["modes"].items():
        lines.append(f"  {cache:<14} 2 rows x 4 steps {m['seconds']:6.1f} s, peak RSS {m['peak_over_weights']:.2f}x the "
                     f"weights, finite logits {m['finite_logits']}, logits at <= {m['max_logit_positions_per_row']} "
                     f"positions a row")
    lines += [f"  {cache:<14} refused: {why.split(';')[0]}" for cache, why in r["refused"].items()]
    return "\n".join(lines)
