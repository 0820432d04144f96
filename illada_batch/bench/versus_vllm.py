"""``illada-batch bench --backend vllm``: the diffusion engine and vLLM side by side in one
run, on the same rows (the task suite: a few-shot prefix of 400+ tokens shared by every row
of a task), the same tokenizer, the same generation length, the same batch size, the same
thread count, and models of the same size (tiny-llada and tiny-qwen2: 1.38M parameters).

Tokens are counted alike for both: the response's text tokens plus its EOS when it stopped
there. Each engine is warmed up on a few other rows first; vLLM's start-up (compilation) is
reported on its own line, not in its tokens/s. Prints one table and writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import replace

GEN = 32
BATCH = 16


def _rows(tok, n_rows: int, seed: int):
    from illada_batch.tasks.evaluate import suite_rows

    return suite_rows(tok, seed=seed, rows_per_task=max(1, n_rows // 5), prefixes_per_task=1, min_prefix_tokens=400)


def _measure(engine, label: str, model: str, params: list, suite, warmup) -> dict:
    """The engine on the task-suite rows of ``suite`` (prefixes, rows); ``params[i]`` is row i's."""
    from illada_batch.tasks.evaluate import accuracy, suite_requests

    prefixes, rows = suite
    engine.run(suite_requests(engine.tokenizer, *warmup, params[0]))
    passes = engine.counters.forward_passes
    t0 = time.perf_counter()
    results = engine.run(suite_requests(engine.tokenizer, prefixes, rows, params))
    seconds = time.perf_counter() - t0
    lengths = [len(res.token_ids) + (res.finish_reason == "eos") for res in results]
    return {"engine": label, "model": model, "rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds,
            "tokens_per_s": sum(lengths) / seconds, "tokens_per_row": sum(lengths) / len(rows),
            "eos_rate": sum(res.finish_reason == "eos" for res in results) / len(rows),
            "forward_passes": engine.counters.forward_passes - passes,
            "accuracy": accuracy(prefixes, rows, results)["overall"], "_lengths": lengths}


def _params(path) -> int:
    from safetensors import safe_open

    from illada_batch.model.checkpoint import resolve_model_path

    total = 0
    for f in resolve_model_path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return total


def _table(results: list[dict]) -> str:
    head = (f"{'engine':<28}{'model':<12}{'params':>8}{'rows/s':>8}{'tok/s':>9}{'tok/row':>8}{'eos':>6}"
            f"{'fwd passes':>11}{'accuracy':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['engine']:<28}{r['model']:<12}{r['params'] / 1e6:>7.2f}M{r['rows_per_s']:>8.2f}"
                     f"{r['tokens_per_s']:>9.1f}{r['tokens_per_row']:>8.1f}{r['eos_rate']:>6.0%}"
                     f"{r['forward_passes']:>11}{r['accuracy']:>9.1%}")
    return "\n".join(lines)


def main(model: str = "tiny-llada", ar_model: str = "tiny-qwen2", rows: int = 64, out_path: str = "bench.json") -> int:
    import torch

    from illada_batch.decoding.params import SamplingParams
    from illada_batch.engine.diffusion import Engine
    from illada_batch.model.checkpoint import resolve_model_path

    threads = int(os.environ.get("ILLADA_THREADS", "1"))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # vLLM's CPU worker reads it
    diffusion = Engine.from_pretrained(model, cache="prefix", max_batch_size=BATCH)
    tok = diffusion.tokenizer
    suite = _rows(tok, rows, seed=20_000)
    warmup = _rows(tok, 5, seed=21_000)
    prefixes, task_rows = suite
    fixed = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=True)
    out = []
    for label, params in (("diffusion, 32 steps", fixed), ("diffusion, threshold 0.9", replace(fixed, threshold=0.9))):
        out.append(_measure(diffusion, label, model, [params] * len(task_rows), suite, warmup))
    del diffusion

    from illada_batch.engine.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    ar = VLLMEngine(resolve_model_path(ar_model), prefix_cache=True, max_batch_size=BATCH)
    startup = time.perf_counter() - t0
    probe = prefixes[task_rows[0].prefix_id]
    if ar.tokenizer.encode(probe) != tok.encode(probe):
        raise SystemExit(f"{ar_model} has another tokenizer than {model}: the rows would differ")
    # Second vLLM run: each row decodes as many tokens as the diffusion model wrote for it (its
    # text and EOS), so rows/s compares the same work even though tiny-qwen2 never says EOS.
    same_len = [SamplingParams(steps=n, gen_length=n, block_length=n) for n in out[0]["_lengths"]]
    try:
        out.append(_measure(ar, "vllm, prefix caching", ar_model, [fixed] * len(task_rows), suite, warmup))
        out.append(_measure(ar, "vllm, diffusion's lengths", ar_model, same_len, suite, warmup))
    finally:
        ar.close()
    for r in out:
        r["params"] = _params(r["model"])
        del r["_lengths"]
    print(_table(out))
    shortest = min(len(tok.encode(p)) for p in prefixes.values())
    print(f"\n{len(task_rows)} rows, prefixes of {shortest}+ tokens, gen_length {GEN}, batch {BATCH}, "
          f"{threads} thread(s); vllm start-up (not counted above) {startup:.1f} s")
    d32, dthr, ar_full, ar_same = out
    print(f"vllm / diffusion, tokens/s: {ar_full['tokens_per_s'] / d32['tokens_per_s']:.1f}x (32 steps), "
          f"{ar_full['tokens_per_s'] / dthr['tokens_per_s']:.1f}x (threshold 0.9); rows/s at diffusion's lengths: "
          f"{ar_same['rows_per_s'] / d32['rows_per_s']:.1f}x, {ar_same['rows_per_s'] / dthr['rows_per_s']:.1f}x")
    report = {"machine": platform.processor() or platform.machine(), "threads": threads, "gen_length": GEN,
              "batch": BATCH, "vllm_startup_s": startup, "results": out}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {out_path}")
    return 0
