"""Exact-match accuracy of a model on the task suite (``illada-batch eval``)."""

from __future__ import annotations

import time
from collections import defaultdict

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.tasks import suite as tasks


def suite_rows(tok, seed: int = 10_000, rows_per_task: int = 100, prefixes_per_task: int = 2,
               min_prefix_tokens: int = 400, task_names=tasks.TASKS):
    return tasks.make_suite(seed, rows_per_task, prefixes_per_task, min_prefix_tokens,
                            count_tokens=lambda s: len(tok.encode(s)), tasks=task_names)


def suite_requests(tok, prefixes: dict[str, str], rows, params: SamplingParams | list[SamplingParams]) -> list[Request]:
    """One request per task-suite row (its prefix shared by the rows of its task); ``params``
    is one ``SamplingParams`` for every row, or one per row."""
    per_row = params if isinstance(params, list) else [params] * len(rows)
    prefix_ids = {pid: tuple(tok.encode(text)) for pid, text in prefixes.items()}
    return [Request(r.id, tuple(tok.encode(r.prompt)), prefix_ids[r.prefix_id], p) for r, p in zip(rows, per_row)]


def accuracy(prefixes: dict[str, str], rows, results) -> dict[str, float]:
    """Per-task and overall exact-match accuracy of ``results`` (engine ``Result``s, in row order)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, res in zip(rows, results):
        hits[r.task].append(res.text is not None and tasks.check(r.task, prefixes[r.prefix_id], r.prompt, res.text))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["overall"] = sum(sum(v) for v in hits.values()) / max(1, len(rows))
    return acc


def evaluate(engine: Engine, prefixes: dict[str, str], rows, params: SamplingParams) -> dict:
    """Per-task and overall exact-match accuracy, plus the results (for agreement checks).
    The one task-suite runner: ``eval``, the benchmarks and training's evaluation use it."""
    requests = suite_requests(engine.tokenizer, prefixes, rows, params)
    t0 = time.perf_counter()
    results = engine.run(requests)
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(prefixes, rows, results), "results": results, "seconds": seconds}
