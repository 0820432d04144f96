"""``illada-batch bench --model-shape llada-8b|llada-moe|llada2-mini|dream-7b --random-weights``:
the modes table at a real model's shape (each family's ``presets``, built from its config
class) with random weights (no accuracy), in each cache mode the engine accepts for the
family, 512-token shared prefix and 32-token
prompts of random ids, gen_length 32 (fixed steps and threshold 0.9), batch 1, 16 and 64,
on whatever device is here (bf16 and SDPA on CUDA): tokens/s, peak memory, and model FLOP
utilisation (the forwards' matrix FLOPs over ``--peak-tflops``, default the GPU's bf16
dense peak when known), and beside each run's measured time per step the roofline's
(``bench/roofline.py``: the run's own counted steps priced at the GPU's published peak and
bandwidth). Prepared for a GPU; not yet run on one."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from illada_batch.bench.measure import run_requests, strip, table, with_agreement
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.requests import Request

GEN = 32
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16 dense, per GPU


def shapes() -> dict:
    """Every family's real shapes: name -> (family, config)."""
    from illada_batch.model.registry import FAMILIES

    return {name: (family, cfg) for family in FAMILIES for name, cfg in family.presets.items()}


def random_model(shape: str):
    """The model of ``shape`` with its own random init, built in bf16 on CUDA (never a float32
    copy first: LLaDA2.0-mini's 16B parameters would need 64 GB) and float32 on CPU."""
    from illada_batch.model.registry import model_class

    family, cfg = shapes()[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, default = (torch.bfloat16 if dev == "cuda" else torch.float32), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = model_class(family)(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def flops_per_query_token(model) -> float:
    """Matrix FLOPs of one query position through the blocks (attention scores excluded): two
    per weight a token reads (MoE: the experts it is routed to; the card says how many)."""
    block_weights = sum(p.numel() for block in model.blocks for p in block.parameters())
    idle_experts = model.card.parameters - model.card.active_parameters
    return 2.0 * (block_weights - idle_experts)


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measured_vs_roofline(modes: list[dict], cfg) -> str:
    """Each run's measured ms per step beside the roofline's for the same counted steps."""
    from illada_batch.bench.roofline import DEVICES, predict

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    device = next((d for key, d in DEVICES.items() if key.upper() in name), None)
    if device is None:
        return f"no roofline for this device ({name or 'CPU'}): it knows {', '.join(DEVICES)}"
    lines = [f"measured vs roofline on {device.name} (bf16):"]
    for r in modes:
        tokens = r["tokens_per_s"] * r["seconds"]
        p = predict(r["_traffic"], cfg, device, int(tokens))
        lines.append(f"{r['cache']:<14}{r['decoding']:<10} batch {r['batch']:>3}: measured "
                     f"{r['seconds'] / r['forward_passes'] * 1e3:8.2f} ms/step, roofline "
                     f"{p['seconds'] / max(1, p['steps']) * 1e3:8.2f} ms/step ({p['tokens_per_s']:.0f} tok/s predicted, "
                     f"{r['tokens_per_s']:.0f} measured)")
    return "\n".join(lines)


CPU_SHAPE_PARAMETERS = 10**9  # a --model-shape larger than this needs a GPU


def shape_command(shape: str, tp: int, random_weights: bool, rows: int, caches: list[str], out: str) -> int:
    """``bench --model-shape``: with ``tp`` > 1 the placement (what each rank holds) and a
    refusal without ``tp`` GPUs; else the modes table at that shape, refused in one line where
    it cannot run (a shape too large for a CPU, no ``--random-weights``)."""
    from illada_batch.errors import UserError

    family, cfg = shapes()[shape]
    params = family.card(cfg).parameters
    if tp > 1:  # the placement first: does the shape split, what a rank holds
        from illada_batch.bench.tp_plan import plan_line, tp_plan

        print(plan_line(tp_plan(shape, family, cfg, tp)))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < tp:
            raise UserError(f"--model-shape {shape} --tp {tp}: needs {tp} CUDA GPUs on one node, found {gpus} "
                            f"({params / 1e9:.1f}B parameters; on CPU, `bench --only wide --tp 2` runs a few layers)")
        raise UserError(f"--model-shape {shape} --tp {tp}: the sharded modes table is not built yet; run a job "
                        f"with engine.tensor_parallel_size: {tp}")
    if params > CPU_SHAPE_PARAMETERS and not torch.cuda.is_available():
        raise UserError(f"--model-shape {shape}: needs a CUDA GPU ({params / 1e9:.1f}B parameters, "
                        f"{params * 2 / 1e9:.0f} GB in bf16; on CPU, `bench --only wide` runs a few layers of it)")
    if not random_weights:
        raise UserError("--model-shape needs --random-weights (no checkpoint of that shape is shipped)")
    return bench_shape(shape, rows, caches, out)


def bench_shape(shape: str = "llada-8b", rows: int = 64, caches: list[str] | None = None,
                out_path: str = "bench.json") -> int:
    """The modes table at ``shape`` with random weights (a GPU for llada-8b); writes ``out_path``."""
    from illada_batch.bench.families import refusal
    from illada_batch.decoding.params import CacheMode

    model = random_model(shape)
    refused = {c: refusal(model, c) for c in caches or [m.value for m in CacheMode.concrete()]}
    caches = [c for c, why in refused.items() if why is None]
    V = model.card.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = tuple(torch.randint(0, V - 1000, (512,), generator=g).tolist())
    prompts = [tuple(torch.randint(0, V - 1000, (32,), generator=g).tolist()) for _ in range(rows)]
    fixed = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=False)
    peak = peak_tflops()
    modes = []
    for params in (fixed, replace(fixed, threshold=0.9)):
        reqs = [Request(str(i), p, prefix, params) for i, p in enumerate(prompts)]
        for batch in (1, 16, 64):
            runs = [run_requests(model, cache, reqs[:max(batch, 4)], batch)[0] for cache in caches]
            for r in runs:
                tflops = r["query_per_token"] * r["tokens_per_s"] * flops_per_query_token(model) / 1e12
                r["model_tflops"], r["mfu"] = tflops, (tflops / peak if peak else None)
            base = next((r for r in runs if r["cache"] == "off"), None)
            modes += with_agreement(runs, base) if base is not None else runs
    print(f"{shape} ({model.card.family}, {model.card.parameters / 1e9:.1f}B parameters, "
          f"{model.card.active_parameters / 1e9:.2f}B active), random weights, {model.device}, 512-token shared prefix")
    for cache, why in refused.items():
        if why is not None:
            print(f"{cache}: refused ({why.split(';')[0]})")
    print(table(modes))
    for r in modes:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['cache']:<14}{r['decoding']:<10} batch {r['batch']:>3}: {r['model_tflops']:.2f} TFLOP/s, MFU {mfu}")
    print(measured_vs_roofline(modes, model.config))
    with open(out_path, "w") as f:
        json.dump({"shape": shape, "device": str(model.device), "modes": strip(modes)}, f, indent=2)
    return 0
