"""``illada-batch bench --only wide --tp N``: each rank's peak memory at LLaDA-8B's width
(``wide.py``'s random checkpoint: 4 layers, bf16) against 1/N of the weights, beside TP 1's.

TP 1 runs in this process; TP N runs this process as rank 0 and N-1 local processes
(``Engine.from_pretrained(..., tensor_parallel_size=N)``). A rank's peak is its process's
peak RSS (VmHWM, reset before each run), read while the ranks are alive. Every rank reads
only its slices of the safetensors, so its load never holds the full weights."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from illada_batch.bench.measure import peak_bytes, peak_reset
from illada_batch.bench.wide import write_random_checkpoint
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.configs.llada import PRESETS


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def bench_wide_tp(ranks: int, cache: str = "off", layers: int = 4) -> dict:
    cfg = replace(PRESETS["llada-8b"], n_layers=layers)
    tmp = Path(tempfile.mkdtemp(prefix="illada-wide-tp-"))
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(steps=4, gen_length=32, block_length=32, early_stop=False)
    reqs = [Request(str(i), tuple(torch.randint(0, cfg.vocab_size - 1000, (32,), generator=g).tolist()), (), params)
            for i in range(2)]
    out = {"layers": layers, "ranks": ranks, "cache": cache}
    try:
        weights = out["weights_bytes"] = write_random_checkpoint(cfg, tmp)
        for n in (1, ranks):
            peak_reset()
            t0 = time.perf_counter()
            engine = Engine.from_pretrained(tmp, cache=cache, dtype=torch.bfloat16, max_batch_size=2,
                                            tensor_parallel_size=n)
            t1 = time.perf_counter()
            engine.run(reqs)
            t2 = time.perf_counter()
            pids = [p.pid for p in engine.peers.processes] if engine.peers else []
            peaks = [peak_bytes()] + [_vm_hwm(pid) for pid in pids]
            held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
            out[f"tp{n}"] = {"load_s": t1 - t0, "run_s": t2 - t1, "rank0_param_bytes": held,
                             "peak_bytes": peaks, "peak_over_weights": [p / weights for p in peaks]}
            engine.close()
            del engine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def report(r: dict) -> str:
    w = r["weights_bytes"]
    lines = [f"LLaDA-8B width, {r['layers']} layers, bf16 ({w / 1e9:.2f} GB), cache {r['cache']}, 2 rows x 4 steps:"]
    for key in ("tp1", f"tp{r['ranks']}"):
        m = r[key]
        peaks = ", ".join(f"{p / 1e9:.2f} GB ({p / w:.2f}x)" for p in m["peak_bytes"])
        lines.append(f"  {key}: rank 0 holds {m['rank0_param_bytes'] / 1e9:.2f} GB of weights; peak RSS per rank "
                     f"{peaks}; load {m['load_s']:.1f} s, run {m['run_s']:.1f} s")
    one, many = r["tp1"]["peak_bytes"][0], max(r[f"tp{r['ranks']}"]["peak_bytes"])
    lines.append(f"  the largest TP {r['ranks']} rank's peak / TP 1's: {many / one:.2f} (1/N = {1 / r['ranks']:.2f})")
    return "\n".join(lines)
