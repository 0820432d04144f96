"""The task suite as a Parquet file (one row per task row, with its full prefix), and its
command line::

    python -m illada_batch.tasks.dataset --out data.parquet --seed 1 \\
        --rows-per-task 100 --prefixes-per-task 2 --min-prefix-tokens 400
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from illada_batch.tasks.suite import TASKS, TaskRow, make_suite

COLUMNS = ("id", "task", "prefix_id", "prefix", "prompt", "answer")


def write_parquet(path: str, prefixes: dict[str, str], rows: Sequence[TaskRow]) -> None:
    """Write rows (each with its full prefix text) as a string-column table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {
        "id": [r.id for r in rows],
        "task": [r.task for r in rows],
        "prefix_id": [r.prefix_id for r in rows],
        "prefix": [prefixes[r.prefix_id] for r in rows],
        "prompt": [r.prompt for r in rows],
        "answer": [r.answer for r in rows],
    }
    table = pa.table({k: pa.array(data[k], type=pa.string()) for k in COLUMNS})
    pq.write_table(table, path)


def read_parquet(path: str) -> tuple[dict[str, str], list[TaskRow]]:
    """Inverse of :func:`write_parquet`."""
    import pyarrow.parquet as pq

    cols = pq.read_table(path).to_pydict()
    prefixes = dict(zip(cols["prefix_id"], cols["prefix"]))
    rows = [TaskRow(*vals) for vals in zip(cols["id"], cols["task"], cols["prefix_id"],
                                           cols["prompt"], cols["answer"])]
    return prefixes, rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Write the few-shot task suite as parquet.")
    ap.add_argument("--out", required=True, help="output .parquet path")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows-per-task", type=int, default=100)
    ap.add_argument("--prefixes-per-task", type=int, default=2)
    ap.add_argument("--min-prefix-tokens", type=int, default=400)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to count prefix tokens with (default: approximation)")
    args = ap.parse_args(argv)

    count_tokens = None
    if args.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(args.tokenizer)
        count_tokens = lambda s: len(tok.encode(s, add_special_tokens=False).ids)  # noqa: E731
    tasks = tuple(t for t in args.tasks.split(",") if t)
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; expected one of {', '.join(TASKS)}")
    prefixes, rows = make_suite(args.seed, args.rows_per_task, args.prefixes_per_task,
                                args.min_prefix_tokens, count_tokens, tasks)
    write_parquet(args.out, prefixes, rows)
    print(f"wrote {len(rows)} rows, {len(prefixes)} prefixes to {args.out}")


if __name__ == "__main__":
    main()
