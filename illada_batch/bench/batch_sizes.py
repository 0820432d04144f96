"""Tokens/s against batch size, for each cache mode: the same task-suite rows (a few-shot
prefix of 400+ tokens shared by every row of a task) run at each batch size, fixed steps,
``gen_length`` 32 in one block, early stop."""

from __future__ import annotations

from illada_batch.bench.measure import strip
from illada_batch.decoding.params import SamplingParams
from illada_batch.tasks.evaluate import suite_rows

SIZES = (1, 4, 16, 64)
GEN = 32


def bench_batch_sizes(model, rows_per_task: int, caches: list[str], sizes=SIZES) -> list[dict]:
    """One run per (cache mode, batch size) over the same rows; sizes above the row count are
    left out (they would run the same batch as the row count)."""
    from illada_batch.bench.modes import run_mode

    prefixes, rows = suite_rows(model.tokenizer, seed=50_000, rows_per_task=rows_per_task, prefixes_per_task=1,
                                min_prefix_tokens=400)
    params = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=True)
    batches = [b for b in sizes if b <= len(rows)] or [len(rows)]
    return strip([run_mode(model, cache, params, prefixes, rows, b) for cache in caches for b in batches])


def table(runs: list[dict]) -> str:
    batches = sorted({r["batch"] for r in runs})
    at = {(r["cache"], r["batch"]): r["tokens_per_s"] for r in runs}
    head = f"{'tokens/s':<14}" + "".join(f"{'batch ' + str(b):>11}" for b in batches)
    lines = [head, "-" * len(head)]
    for cache in dict.fromkeys(r["cache"] for r in runs):
        lines.append(f"{cache:<14}" + "".join(f"{at[(cache, b)]:>11.1f}" if (cache, b) in at else f"{'-':>11}"
                                              for b in batches))
    return "\n".join(lines)
