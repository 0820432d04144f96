"""``illada-batch bench --model-shape llada-8b --random-weights``: the modes table at a real
model's shape with random weights (no accuracy), 512-token prefix and 32-token prompts of
random ids, on whatever device is here."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from illada_batch.bench.measure import run_requests, strip, table, with_agreement
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.requests import Request

GEN = 32


def random_model(shape: str):
    from illada_batch.model.config import PRESETS
    from illada_batch.model.llada import LLaDA

    cfg = PRESETS[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LLaDA(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    return model


def bench_shape(args) -> int:
    model = random_model(args.model_shape)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = tuple(torch.randint(0, V - 1000, (512,), generator=g).tolist())
    prompts = [tuple(torch.randint(0, V - 1000, (32,), generator=g).tolist()) for _ in range(args.rows)]
    fixed = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN)
    modes = []
    for params in (fixed, replace(fixed, threshold=0.9)):
        reqs = [Request(str(i), p, prefix, params) for i, p in enumerate(prompts)]
        runs = [run_requests(model, cache, reqs, batch=16)[0] for cache in args.cache.split(",")]
        base = next((r for r in runs if r["cache"] == "off"), None)
        modes += with_agreement(runs, base) if base is not None else runs
    print(f"{args.model_shape}, random weights, {model.device}, {args.rows} rows, 512-token shared prefix")
    print(table(modes))
    with open(args.out, "w") as f:
        json.dump({"shape": args.model_shape, "device": str(model.device), "rows": args.rows, "modes": strip(modes)},
                  f, indent=2)
    return 0
