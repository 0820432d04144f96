"""``illada-batch bench --only wide --tp N``: a tensor-parallel replica of N ranks (local
processes, gloo, one thread a rank) beside one device (TP 1), at the tiny shape (tiny-llada)
and at LLaDA-8B's width (``wide.py``'s random checkpoint: a few layers, bf16):

- step time (a timed run after a warm-up, over its forwards), TP N over TP 1, and the share
  of each rank's run spent in collectives (``model/layers/comm.py``, on for the timed run:
  it includes waiting for the other rank), with the bytes each kind moved per step;
- at the 8B width, each rank's memory: weights it holds, resident before its load (Python,
  torch, gloo), after it, and its peak (load and runs; the weights are the process's own
  memory, copied out of the file as a GPU load copies them), against TP 1's;
- what the same collectives would take on GPUs (``gpu_comm``): analytic, not measured.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from illada_batch.bench.tp_links import LINKS, gpu_comm_seconds
from illada_batch.bench.wide import shallow, write_random_checkpoint
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.rank_memory import memory, reset_peak
from illada_batch.engine.requests import Request
from illada_batch.engine.tensor_parallel import rank_report
from illada_batch.model.layers.comm import COMM


def _requests(vocab: int, rows: int, steps: int) -> list[Request]:
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(steps=steps, gen_length=32, block_length=32, early_stop=False)
    return [Request(str(i), tuple(torch.randint(0, vocab - 1000, (32,), generator=g).tolist()), (), params)
            for i in range(rows)]


def _replica(path, n: int, cache: str, dtype, reqs_of) -> dict:
    """One replica of ``n`` ranks: a warm-up run, then a timed run with collective timing on."""
    os.environ["ILLADA_COMM_TIMING"] = "1"  # the ranks spawned below time their collectives
    reset_peak()  # this process's peak so far (the checkpoint's writing) is not the replica's
    before = memory()
    engine = Engine.from_pretrained(path, cache=cache, dtype=dtype, max_batch_size=4, tensor_parallel_size=n)
    if engine.peers is None:
        engine.load_memory = {"before": before, "after": memory()}
    reqs = reqs_of(engine.model.card.vocab_size)
    try:
        COMM.on = False
        engine.run(reqs)  # warm-up: gloo's first connections, allocations
        first = engine.peers.report(engine) if engine.peers else [rank_report(engine)]  # peaks since start
        COMM.on = True
        forwards = engine.counters.forward_passes
        t0 = time.perf_counter()
        engine.run(reqs)
        run_s = time.perf_counter() - t0
        forwards = engine.counters.forward_passes - forwards
        timed = engine.peers.report(engine) if engine.peers else [rank_report(engine)]
        held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    finally:
        COMM.on = False
        os.environ.pop("ILLADA_COMM_TIMING", None)
        engine.close()
    ranks = [{"load": f["load"], "peak": max(f["memory"].get("peak", 0), t["memory"].get("peak", 0)),
              "run_peak": t["memory"].get("peak", 0),  # the timed run's alone (the load's read is over)
              "comm_s": sum(c["seconds"] for c in t["comm"].values()), "comm": t["comm"]}
             for f, t in zip(first, timed)]
    return {"ranks": ranks, "run_s": run_s, "forwards": forwards, "step_s": run_s / forwards,
            "rank0_param_bytes": held}


def _pair(path, tp: int, cache: str, dtype, reqs_of) -> dict:
    out = {f"tp{n}": _replica(path, n, cache, dtype, reqs_of) for n in (1, tp)}
    many = out[f"tp{tp}"]
    out["step_ratio"] = many["step_s"] / out["tp1"]["step_s"]
    out["comm_share"] = [r["comm_s"] / many["run_s"] for r in many["ranks"]]
    per_step = {}
    for kind, c in many["ranks"][0]["comm"].items():
        per_step[kind] = {"calls": c["calls"] / many["forwards"], "bytes": c["bytes"] / many["forwards"]}
    out["per_step"] = per_step
    out["gpu_comm_s"] = {name: gpu_comm_seconds(per_step, tp, link) for name, link in LINKS.items()}
    return out


def bench_wide_tp(ranks: int, cache: str = "off", layers: int = 4) -> dict:
    torch.set_num_threads(int(os.environ.get("ILLADA_THREADS", "1")))
    out = {"ranks": ranks, "cache": cache, "layers": layers, "threads": torch.get_num_threads()}
    out["tiny"] = _pair("tiny-llada", ranks, cache, torch.float32, lambda v: _requests(v, 4, 16))
    family, cfg = shallow("llada-8b", layers)
    tmp = Path(tempfile.mkdtemp(prefix="illada-wide-tp-"))
    try:
        out["weights_bytes"] = write_random_checkpoint(family, cfg, tmp)
        out["wide"] = _pair(tmp, ranks, cache, torch.bfloat16, lambda v: _requests(v, 2, 4))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _comm_lines(r: dict, tp: int) -> list[str]:
    lines = [f"    step TP {tp} / TP 1: {r['step_ratio']:.2f} ({r[f'tp{tp}']['step_s'] * 1e3:.1f} ms / "
             f"{r['tp1']['step_s'] * 1e3:.1f} ms); share of TP {tp}'s run in collectives, per rank: "
             + ", ".join(f"{s:.0%}" for s in r["comm_share"])]
    for kind, c in r["per_step"].items():
        lines.append(f"    {kind:<10} {c['calls']:6.1f} calls, {c['bytes'] / 1e6:8.3f} MB a step")
    gpu = ", ".join(f"{name} {s * 1e6:.0f} us" for name, s in r["gpu_comm_s"].items())
    return lines + [f"    the same collectives on GPUs (analytic, not measured): {gpu} a step"]


def report(r: dict) -> str:
    tp, w = r["ranks"], r["weights_bytes"]
    lines = [f"TP {tp} vs TP 1, cache {r['cache']}, gloo, {r['threads']} thread(s) a rank, "
             f"on {os.cpu_count()} shared cores (CPU only):",
             "  tiny-llada (float32), 4 rows x 16 steps:", *_comm_lines(r["tiny"], tp),
             f"  LLaDA-8B width, {r['layers']} layers, bf16 random weights ({w / 1e9:.2f} GB), 2 rows x 4 steps:",
             *_comm_lines(r["wide"], tp)]
    for n in (1, tp):
        m = r["wide"][f"tp{n}"]
        for i, k in enumerate(m["ranks"]):
            b, a = k["load"]["before"].get("rss", 0), k["load"]["after"].get("rss", 0)
            lines.append(f"    TP {n} rank {i}: before load {b / 1e9:.2f} GB, after {a / 1e9:.2f} GB, "
                         f"peak {k['peak'] / 1e9:.2f} GB ({k['peak'] / w:.2f}x the weights), "
                         f"in the timed run {k['run_peak'] / 1e9:.2f} GB ({k['run_peak'] / w:.2f}x)")
    for key, what in (("peak", "peak (load and runs)"), ("run_peak", "peak in the timed run")):
        one = r["wide"]["tp1"]["ranks"][0][key]
        most = max(k[key] for k in r["wide"][f"tp{tp}"]["ranks"])
        lines.append(f"    the largest TP {tp} rank's {what} / TP 1's: {most / one:.2f} (target 0.6; 1/N = {1 / tp:.2f})")
    return "\n".join(lines)
