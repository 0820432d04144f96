"""``illada-batch bench --only wide``: LLaDA-8B's width on a CPU. A random checkpoint with
LLaDA-8B's d_model 4096, 32 heads, MLP 12,288 and vocabulary 126,464 but 4 layers, bf16,
written shard by shard as safetensors with an index (never whole in memory), loaded
streamed; then a few steps in each cache mode on 2 rows (128-token shared prefix, 32-token
prompts, gen_length 32 in 4 steps). Reports the peak RSS over the weights' size, whether
every logit was finite, and the most positions any forward computed full-vocabulary logits
for (a step needs only the current block's)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from illada_batch.bench.measure import peak_bytes, peak_reset
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.checkpoint import INDEX_NAME, load_model
from illada_batch.model.configs.llada import PRESETS
from illada_batch.model.llada import LLaDA


def write_random_checkpoint(cfg, directory: Path, shard_bytes: int = 2**30) -> int:
    """Random bf16 weights (std 0.02, norms 1), one tensor at a time; -> total bytes."""
    with torch.device("meta"):
        names = {k: v.shape for k, v in LLaDA(cfg).state_dict().items()}
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


def bench_wide(caches: list[str], layers: int = 4) -> dict:
    cfg = replace(PRESETS["llada-8b"], n_layers=layers)
    tmp = Path(tempfile.mkdtemp(prefix="illada-wide-"))
    try:
        weights = write_random_checkpoint(cfg, tmp)
        peak_reset()
        t0 = time.perf_counter()
        model = load_model(tmp, device="cpu", dtype=torch.bfloat16)
        out = {"layers": layers, "weights_gb": weights / 1e9, "load_s": time.perf_counter() - t0,
               "load_peak_over_weights": peak_bytes() / weights, "modes": {}}
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
    g = torch.Generator().manual_seed(1)
    prefix = tuple(torch.randint(0, cfg.vocab_size - 1000, (128,), generator=g).tolist())
    params = SamplingParams(steps=4, gen_length=32, block_length=32, early_stop=False)
    reqs = [Request(str(i), tuple(torch.randint(0, cfg.vocab_size - 1000, (32,), generator=g).tolist()), prefix,
                    params) for i in range(2)]
    for cache in caches:
        seen.update(finite=True, max_positions=0)
        t0 = time.perf_counter()
        Engine(model, cache=cache, max_batch_size=2).run(reqs)
        out["modes"][cache] = {"seconds": time.perf_counter() - t0, "peak_over_weights": peak_bytes() / weights,
                               "finite_logits": seen["finite"], "max_logit_positions_per_row": seen["max_positions"]}
    return out


def report(r: dict) -> str:
    lines = [f"LLaDA-8B width, {r['layers']} layers, bf16 random weights ({r['weights_gb']:.2f} GB, sharded): "
             f"streamed load {r['load_s']:.1f} s, RSS after it {r['load_peak_over_weights']:.2f}x the weights "
             f"(pages not yet read)"]
    for cache, m in r["modes"].items():
        lines.append(f"  {cache:<14} 2 rows x 4 steps {m['seconds']:6.1f} s, peak RSS {m['peak_over_weights']:.2f}x the "
                     f"weights, finite logits {m['finite_logits']}, logits at <= {m['max_logit_positions_per_row']} "
                     f"positions a row")
    return "\n".join(lines)
