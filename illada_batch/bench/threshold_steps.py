"""How many tokens a step of threshold decoding fixes, on the task suite (a block-causal
model, its exact cache, temperature 0, early stop off so every row decodes ``gen_length``
positions): tokens per step, steps per block (``block_length`` / tokens per step), query
tokens the model ran per generated token, and exact-match accuracy::

    python -m illada_batch.bench.threshold_steps --model illada_batch/models/tiny-llada2 --threshold 0.9

The random tiny LLaDA 2.x to compare with: ``python -m illada_batch.train.tiny_llada2 --out /tmp/tiny-llada2``.
"""

from __future__ import annotations

import argparse
import json

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.model.checkpoint import load_model
from illada_batch.tasks.evaluate import evaluate, suite_rows


def measure(model, threshold: float, rows_per_task: int = 10, gen_length: int = 64, block_length: int = 32,
            cache: str = "auto") -> dict:
    params = SamplingParams(steps=block_length * (gen_length // block_length), gen_length=gen_length,
                            block_length=block_length, threshold=threshold, early_stop=False)
    engine = Engine(model, cache=cache, max_batch_size=16)
    prefixes, rows = suite_rows(model.tokenizer, rows_per_task=rows_per_task)
    res = evaluate(engine, prefixes, rows, params)
    steps = sum(r.steps for r in res["results"])
    decoded = gen_length * len(rows)
    c = engine.counters
    return {"threshold": threshold, "rows": len(rows), "gen_length": gen_length, "block_length": block_length,
            "tokens_per_step": decoded / steps, "steps_per_block": block_length * steps / decoded,
            "query_tokens_per_generated_token": c.query_tokens / decoded,
            "query_tokens_per_text_token": c.query_tokens / max(1, c.tokens),
            "accuracy": res["accuracy"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="illada_batch/models/tiny-llada2")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--rows-per-task", type=int, default=10)
    ap.add_argument("--gen-length", type=int, default=64)
    args = ap.parse_args(argv)
    out = measure(load_model(args.model, device="cpu"), args.threshold, args.rows_per_task, args.gen_length)
    print(json.dumps({"model": args.model, **out}, indent=1))


if __name__ == "__main__":
    main()
