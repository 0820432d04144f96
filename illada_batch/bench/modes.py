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

from illada_batch.bench.families import refusal
from illada_batch.bench.measure import run_requests, strip, table, with_agreement
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.errors import UserError
from illada_batch.tasks.evaluate import accuracy, suite_requests, suite_rows

GEN = 32


def run_mode(model, cache: str, params: SamplingParams, prefixes, rows, batch: int) -> dict:
    """``run_requests`` on task-suite rows, with their exact-match accuracy."""
    out, results = run_requests(model, cache, suite_requests(model.tokenizer, prefixes, rows, params), batch)
    out["accuracy"] = accuracy(prefixes, rows, results)["overall"]
    return out


def bench_modes(model, rows_per_task: int, caches: list[str], gens=(GEN, 64), batch: int = 16) -> list[dict]:
    """Every cache mode x (fixed steps, threshold 0.9) x gen_length, block 32, early stop, on
    task-suite rows: accuracy, and agreement with ``off`` at the same decoding and length."""
    prefixes, rows = suite_rows(model.tokenizer, seed=20_000, rows_per_task=rows_per_task, prefixes_per_task=1,
                                min_prefix_tokens=400)
    out = []
    for gen in gens:
        fixed = SamplingParams(steps=gen, gen_length=gen, block_length=GEN, early_stop=True)
        for params in (fixed, replace(fixed, threshold=0.9)):
            runs = [run_mode(model, cache, params, prefixes, rows, batch) for cache in caches]
            base = next((r for r in runs if r["cache"] == "off"), None)
            out += with_agreement(runs, base) if base is not None else runs
    return out


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
    eos = model.card.eos_token_id
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


SECTIONS = ("modes", "long", "batch", "batching", "memory", "pipeline", "driver")  # the default set
ON_REQUEST = ("wide", "families", "blockdiff")  # run only when named in ``only``


def main(model_name: str = "tiny-llada", rows: int = 64, out_path: str = "bench.json", only: list[str] | None = None,
         caches: list[str] | None = None, tp: int = 1, write_tiny=None, block_causal_model: str | None = None) -> int:
    """The benchmark's sections (``only``, default ``SECTIONS``) for the cache modes ``caches``
    (default every mode); prints each table and writes the JSON report to ``out_path``.
    ``write_tiny(family, directory)``: the tiny checkpoint writer the ``families`` section needs;
    ``block_causal_model``: the checkpoint the ``blockdiff`` section runs (tiny LLaDA 2.x)."""
    from functools import partial

    from illada_batch.decoding.params import CacheMode
    from illada_batch.model.checkpoint import load_model

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("ILLADA_THREADS", "1")))
    only, caches = set(only or SECTIONS), caches or [m.value for m in CacheMode.concrete()]
    model = load_model(model_name)
    refused = {c: why for c in caches if (why := refusal(model, c)) is not None}  # the family's card decides
    caches = [c for c in caches if c not in refused]
    for cache, why in refused.items():
        print(f"cache {cache}: refused for {model.card.family} ({why.split(';')[0]})")
    report = {"model": model_name, "family": model.card.family, "device": str(model.device),
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "refused_caches": refused}
    wide = _wide if tp == 1 else (lambda model, rows, caches: _wide_tp(tp, caches))
    for name, section in (("modes", _modes), ("long", _long), ("wide", wide), ("families", partial(_families, write_tiny=write_tiny)),
                          ("blockdiff", _blockdiff), ("batch", _batch),
                          ("batching", _batching), ("memory", _memory), ("pipeline", _pipeline), ("driver", _driver)):
        if name in only:
            report[name] = section(load_model(block_causal_model) if name == "blockdiff" else model, rows, caches)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {out_path}")
    if report.get("batch"):
        from illada_batch.bench.figures import batch_plot

        plot = f"{os.path.splitext(out_path)[0]}-batch.png"
        batch_plot(report["batch"], plot)
        print(f"wrote {plot}")
    return 0


def _modes(model, rows: int, caches: list[str]):
    modes = bench_modes(model, rows_per_task=max(1, rows // 5), caches=caches)
    print(table(modes))
    at = {(r["cache"], r["decoding"], r["gen"]): r for r in modes}
    off, off_t = at.get(("off", "fixed", GEN)), at.get(("off", "threshold", GEN))
    for cache in caches[1:] if off else []:
        r = at[(cache, "fixed", GEN)]
        print(f"{cache} / off, fixed steps, gen {GEN}: {r['tokens_per_s'] / off['tokens_per_s']:.2f}x tokens/s, "
              f"accuracy {r['accuracy'] - off['accuracy']:+.1%}")
    if off and off_t:
        print(f"threshold / fixed steps (off):    {off['steps_per_token'] / off_t['steps_per_token']:.2f}x fewer "
              f"steps per token, accuracy {off_t['accuracy'] - off['accuracy']:+.1%}")
    return strip(modes)


def _long(model, rows: int, caches: list[str]):
    from illada_batch.bench.long_gen import bench_long

    return strip(bench_long(model, caches, rows=min(rows, 16)))


def _wide(model, rows: int, caches: list[str]):  # not in the default set: 3.8 + 3 GB checkpoints are written
    from illada_batch.bench.wide import SHAPES, bench_wide
    from illada_batch.bench.wide import report as wide_report

    out = {}
    for shape in SHAPES:
        out[shape] = bench_wide(caches, shape)
        print(wide_report(out[shape]), flush=True)
    return out


def _families(model, rows: int, caches: list[str], write_tiny):  # every family's tiny checkpoint, not ``model``
    from illada_batch.bench.families import bench_families
    from illada_batch.bench.families import table as families_table

    out = bench_families(write_tiny, min(rows, 16), caches)
    print(families_table(out), flush=True)
    return out


def _wide_tp(tp: int, caches: list[str]):  # each rank's peak memory against 1/N of the weights
    from illada_batch.bench.wide_tp import bench_wide_tp, report

    out = bench_wide_tp(tp, caches[0])
    print(report(out), flush=True)
    return out


def _blockdiff(model, rows: int, caches: list[str]):  # not in the default set: its own model (block-causal)
    from illada_batch.bench.blockdiff import bench_blockdiff
    from illada_batch.model.family import AttentionKind

    if model.card.attention is not AttentionKind.BLOCK_CAUSAL:
        raise UserError(f"bench --only blockdiff: {model.card.family} is not block-causal (it has no exact block "
                        f"cache); give --model a block-causal checkpoint (LLaDA 2.x), or leave --model out")
    return bench_blockdiff(model, rows=rows)


def _batch(model, rows: int, caches: list[str]):  # tokens/s against batch size; plotted beside the JSON
    from illada_batch.bench.batch_sizes import bench_batch_sizes, table

    runs = bench_batch_sizes(model, max(1, rows // 5), caches)
    print(table(runs), flush=True)
    return runs


def _batching(model, rows: int, caches: list[str]):
    out = {}
    for label, min_prefix in (("long", 400), ("short", 0)):
        b = out[label] = bench_batching(model, min_prefix_tokens=min_prefix)
        print(f"engine batch 16 (cache off) / generate one row at a time, {label} rows "
              f"({b['prompt_tokens']:.0f} prompt tokens): {b['speedup_rows_per_s']:.2f}x rows/s "
              f"({b['rows']} rows, identical texts {b['identical_texts']:.0%})")
    return out


def _memory(model, rows: int, caches: list[str]):
    m = bench_memory(model)
    print(f"peak memory, 256 rows / 16 rows sharing a prefix: {m['ratio_256_over_16']:.3f} "
          f"({m['peak_mb_256_rows']:.0f} MB / {m['peak_mb_16_rows']:.0f} MB)")
    return m


def _pipeline(model, rows: int, caches: list[str]):
    from illada_batch.bench.pipeline import bench_pipeline_efficiency

    p = bench_pipeline_efficiency(rows=rows * 8)
    print(f"pipeline efficiency (job on local Ray + S3 / engine in one process, {p['rows']} rows): "
          f"{p['efficiency']:.2f} ({p['job_tokens_per_s']:.1f} / {p['engine_tokens_per_s']:.1f} tok/s); "
          f"engine in the replica / alone {p['engine_in_replica']:.2f}, generating {p['generating_share']:.0%} "
          f"of the job's wall time")
    return p


def _driver(model, rows: int, caches: list[str]):
    from illada_batch.bench.pipeline import bench_driver_overhead

    d = bench_driver_overhead()
    print(f"driver overhead: {d['driver_ms_per_shard']:.1f} ms CPU per shard over {d['shards']} one-row shards "
          f"(wall {d['wall_ms_per_shard']:.1f} ms per shard)")
    return d
