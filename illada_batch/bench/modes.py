"""``illada-batch bench``: the engine's cache and decoding modes side by side, on the
shipped tiny model and its task suite (a few-shot prefix of 400+ tokens shared by every row
of a task), plus batching against one-row-at-a-time ``generate`` and prefix memory.
Prints one table and writes JSON. Every ratio compares two things measured in this run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace

import torch

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.tasks.evaluate import accuracy, suite_requests, suite_rows

GEN = 32


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) on Linux
        except OSError:
            pass


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_requests(model, cache: str, reqs: list[Request], batch: int) -> tuple[dict, list]:
    """One engine over ``reqs``: (speed, steps, prefix hits, peak memory; the results)."""
    engine = Engine(model, cache=cache, max_batch_size=batch)
    _peak_reset()
    t0 = time.perf_counter()
    results = engine.run(reqs)
    seconds = time.perf_counter() - t0
    c = engine.counters
    nfe = sum(res.steps for res in results)
    tokens = sum(len(res.token_ids) + (res.finish_reason == "eos") for res in results)  # text + its EOS
    return {"cache": cache, "decoding": "threshold" if reqs[0].params.threshold else "fixed", "rows": len(reqs),
            "seconds": seconds, "rows_per_s": len(reqs) / seconds, "tokens_per_s": tokens / seconds,
            "steps_per_token": nfe / max(tokens, 1), "prefix_hit_rate": 1 - c.prefix_pages_missed / c.prefix_pages_read if c.prefix_pages_read else None,
            "peak_mb": _peak_bytes() / 2**20, "accuracy": None, "forward_passes": c.forward_passes,
            "_tokens": [res.token_ids for res in results]}, results


def run_mode(model, cache: str, params: SamplingParams, prefixes, rows, batch: int) -> dict:
    """``run_requests`` on task-suite rows, with their exact-match accuracy."""
    out, results = run_requests(model, cache, suite_requests(model.tokenizer, prefixes, rows, params), batch)
    out["accuracy"] = accuracy(prefixes, rows, results)["overall"]
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(rows with identical tokens, positions with identical tokens) as fractions."""
    same_rows = sum(x == y for x, y in zip(a, b)) / len(a)
    pos = sum(sum(p == q for p, q in zip(x + [-1] * (GEN - len(x)), y + [-1] * (GEN - len(y)))) for x, y in zip(a, b))
    return same_rows, pos / (GEN * len(a))


def bench_modes(model, rows_per_task: int, batch: int = 16) -> list[dict]:
    prefixes, rows = suite_rows(model.tokenizer, seed=20_000, rows_per_task=rows_per_task, prefixes_per_task=1,
                                min_prefix_tokens=400)
    fixed = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=True)
    thresh = replace(fixed, threshold=0.9)
    out = []
    for params in (fixed, thresh):
        for cache in ("off", "prefix"):
            out.append(run_mode(model, cache, params, prefixes, rows, batch))
    return with_agreement(out)


def with_agreement(modes: list[dict]) -> list[dict]:
    """Each mode's token agreement with the first (cache off, fixed steps)."""
    base = modes[0]["_tokens"]
    for r in modes:
        r["agree_rows"], r["agree_tokens"] = agreement(base, r.pop("_tokens"))
    return modes


def bench_batching(model, n_rows: int = 32, min_prefix_tokens: int = 400) -> dict:
    """Engine (cache off, batch 16) vs ``generate`` one row at a time: same rows, same outputs.

    Run for long rows (a 400+-token few-shot prefix in each prompt) and short ones (the
    instruction and one example, about 40 tokens): on a CPU one long row already fills the
    matrix units, so batching pays off only for short rows."""
    from illada_batch.decoding.loop import generate

    prefixes, rows = suite_rows(model.tokenizer, seed=30_000, rows_per_task=max(1, n_rows // 5), prefixes_per_task=1,
                                min_prefix_tokens=min_prefix_tokens)
    tok = model.tokenizer
    ids = [tok.encode(prefixes[r.prefix_id]) + tok.encode(r.prompt) for r in rows]
    t0 = time.perf_counter()
    single = []
    for p in ids:
        out = generate(model, torch.tensor([p], device=model.device), steps=GEN, gen_length=GEN, block_length=GEN)
        single.append(out[0, len(p):].tolist())
    t_single = time.perf_counter() - t0
    params = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=True)
    engine = Engine(model, cache="off", max_batch_size=16)
    t0 = time.perf_counter()
    res = engine.run([Request(r.id, tuple(p), (), params) for r, p in zip(rows, ids)])
    t_engine = time.perf_counter() - t0
    eos = model.config.eos_token_id
    same = sum((s[:s.index(eos)] if eos in s else s) == r.token_ids for s, r in zip(single, res))
    return {"rows": len(rows), "prompt_tokens": sum(map(len, ids)) / len(ids), "generate_one_row_s": t_single,
            "engine_batch16_s": t_engine,
            "speedup_rows_per_s": t_single / t_engine, "identical_texts": same / len(rows)}


def bench_memory(model, batch: int = 16) -> dict:
    """Peak memory of 256 rows vs 16 rows sharing one prefix (prefix cache, batch size equal)."""
    prefixes, rows = suite_rows(model.tokenizer, seed=40_000, rows_per_task=256, prefixes_per_task=1,
                                min_prefix_tokens=400, task_names=("reverse",))
    params = SamplingParams(steps=8, gen_length=GEN, block_length=GEN, early_stop=True)
    out = {}
    for n in (16, 256):
        r = run_mode(model, "prefix", params, prefixes, rows[:n], batch)
        out[f"peak_mb_{n}_rows"] = r["peak_mb"]
    out["ratio_256_over_16"] = out["peak_mb_256_rows"] / out["peak_mb_16_rows"]
    return out


def _table(modes: list[dict]) -> str:
    head = f"{'cache':<7}{'decoding':<10}{'rows/s':>8}{'tok/s':>9}{'steps/tok':>10}{'hit rate':>9}" \
           f"{'peak MB':>9}{'accuracy':>9}{'agree rows':>11}{'agree tok':>10}"
    lines = [head, "-" * len(head)]
    for r in modes:
        hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        lines.append(f"{r['cache']:<7}{r['decoding']:<10}{r['rows_per_s']:>8.2f}{r['tokens_per_s']:>9.1f}"
                     f"{r['steps_per_token']:>10.2f}{hit:>9}{r['peak_mb']:>9.0f}{acc:>9}"
                     f"{r['agree_rows']:>11.1%}{r['agree_tokens']:>10.1%}")
    return "\n".join(lines)


def _random_model(shape: str):
    from illada_batch.model.config import PRESETS
    from illada_batch.model.llada import LLaDA

    cfg = PRESETS[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LLaDA(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    return model


def main(args) -> int:
    from illada_batch.model.checkpoint import load_model

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("ILLADA_THREADS", "1")))
    if args.model_shape:
        if args.model_shape != "tiny" and not torch.cuda.is_available():
            raise SystemExit(f"--model-shape {args.model_shape} needs a GPU (its weights alone exceed this machine's memory)")
        if not args.random_weights:
            raise SystemExit("--model-shape needs --random-weights (no checkpoint of that shape is shipped)")
        return _bench_shape(args)
    model = load_model(args.model)
    only = set(args.only.split(",")) if args.only else {"modes", "batching", "memory", "pipeline", "driver"}
    report = {"model": args.model, "device": str(model.device), "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine()}
    if "modes" in only:
        modes = bench_modes(model, rows_per_task=max(1, args.rows // 5))
        report["modes"] = modes
        off, pre, off_t, pre_t = modes
        print(_table(modes))
        print(f"\nprefix / off, fixed steps:        {pre['tokens_per_s'] / off['tokens_per_s']:.2f}x tokens/s, "
              f"accuracy {pre['accuracy'] - off['accuracy']:+.1%}")
        print(f"threshold / fixed steps (off):    {off['steps_per_token'] / off_t['steps_per_token']:.2f}x fewer steps "
              f"per token, accuracy {off_t['accuracy'] - off['accuracy']:+.1%}")
    if "batching" in only:
        report["batching"] = {}
        for label, min_prefix in (("long", 400), ("short", 0)):
            b = report["batching"][label] = bench_batching(model, min_prefix_tokens=min_prefix)
            print(f"engine batch 16 (cache off) / generate one row at a time, {label} rows "
                  f"({b['prompt_tokens']:.0f} prompt tokens): {b['speedup_rows_per_s']:.2f}x rows/s "
                  f"({b['rows']} rows, identical texts {b['identical_texts']:.0%})")
    if "memory" in only:
        m = bench_memory(model)
        report["memory"] = m
        print(f"peak memory, 256 rows / 16 rows sharing a prefix: {m['ratio_256_over_16']:.3f} "
              f"({m['peak_mb_256_rows']:.0f} MB / {m['peak_mb_16_rows']:.0f} MB)")
    if "pipeline" in only:
        from illada_batch.bench.pipeline import bench_pipeline_efficiency

        p = bench_pipeline_efficiency(rows=args.rows * 8)
        report["pipeline"] = p
        print(f"pipeline efficiency (job on local Ray + S3 / engine in one process, {p['rows']} rows): "
              f"{p['efficiency']:.2f} ({p['job_tokens_per_s']:.1f} / {p['engine_tokens_per_s']:.1f} tok/s); "
              f"engine in the replica / alone {p['engine_in_replica']:.2f}, generating {p['generating_share']:.0%} "
              f"of the job's wall time")
    if "driver" in only:
        from illada_batch.bench.pipeline import bench_driver_overhead

        d = bench_driver_overhead()
        report["driver"] = d
        print(f"driver overhead: {d['driver_ms_per_shard']:.1f} ms CPU per shard over {d['shards']} one-row shards "
              f"(wall {d['wall_ms_per_shard']:.1f} ms per shard)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


def _bench_shape(args) -> int:
    """LLaDA-8B's shape with random weights: the modes table (no accuracy: the weights are
    random) on whatever device is here, 512-token prefix and 32-token prompts of random ids."""
    model = _random_model(args.model_shape)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = tuple(torch.randint(0, V - 1000, (512,), generator=g).tolist())
    prompts = [tuple(torch.randint(0, V - 1000, (32,), generator=g).tolist()) for _ in range(args.rows)]
    fixed = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN)
    modes = []
    for params in (fixed, replace(fixed, threshold=0.9)):
        for cache in ("off", "prefix"):
            reqs = [Request(str(i), p, prefix, params) for i, p in enumerate(prompts)]
            modes.append(run_requests(model, cache, reqs, batch=16)[0])
    with_agreement(modes)
    print(f"{args.model_shape}, random weights, {model.device}, {args.rows} rows, 512-token shared prefix")
    print(_table(modes))
    off, pre = modes[0], modes[1]
    print(f"\nprefix / off, fixed steps: {pre['tokens_per_s'] / off['tokens_per_s']:.2f}x tokens/s")
    with open(args.out, "w") as f:
        json.dump({"shape": args.model_shape, "device": str(model.device), "rows": args.rows, "modes": modes}, f, indent=2)
    return 0
