"""Exact-match accuracy of a model on the task suite (``illada-batch eval``); with a response
template, of the answer written into its first slot (slot accuracy)."""

from __future__ import annotations

import time
from collections import defaultdict

from illada_batch.decoding.params import SamplingParams
from illada_batch.decoding.template import ResponseTemplate
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.tasks import suite as tasks


def suite_rows(tok, seed: int = 10_000, rows_per_task: int = 100, prefixes_per_task: int = 2,
               min_prefix_tokens: int = 400, task_names=tasks.TASKS):
    return tasks.make_suite(seed, rows_per_task, prefixes_per_task, min_prefix_tokens,
                            count_tokens=lambda s: len(tok.encode(s)), tasks=task_names)


def suite_requests(tok, prefixes: dict[str, str], rows, params: SamplingParams | list[SamplingParams],
                   response_template: str | None = None) -> list[Request]:
    """One request per task-suite row (its prefix shared by the rows of its task); ``params``
    is one ``SamplingParams`` for every row, or one per row; ``response_template`` (fixed text
    and ``{slot:N}`` slots) is laid out after each row's prompt."""
    per_row = params if isinstance(params, list) else [params] * len(rows)
    prefix_ids = {pid: tuple(tok.encode(text)) for pid, text in prefixes.items()}
    template = ResponseTemplate.parse(response_template).tokenize(tok.encode) if response_template else None
    return [Request(r.id, tuple(tok.encode(r.prompt)), prefix_ids[r.prefix_id], p, template=template)
            for r, p in zip(rows, per_row)]


def accuracy(prefixes: dict[str, str], rows, results) -> dict[str, float]:
    """Per-task and overall exact-match accuracy of ``results`` (engine ``Result``s, in row order):
    of the first slot's text when a response template laid the response out, else of the text."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, res in zip(rows, results):
        answer = res.slots[0] if res.slots else res.text
        hits[r.task].append(answer is not None and tasks.check(r.task, prefixes[r.prefix_id], r.prompt, answer))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["overall"] = sum(sum(v) for v in hits.values()) / max(1, len(rows))
    return acc


def evaluate(engine: Engine, prefixes: dict[str, str], rows, params: SamplingParams,
             response_template: str | None = None) -> dict:
    """Per-task and overall exact-match accuracy, plus the results (for agreement checks).
    The one task-suite runner: ``eval``, the benchmarks and training's evaluation use it."""
    requests = suite_requests(engine.tokenizer, prefixes, rows, params, response_template)
    t0 = time.perf_counter()
    results = engine.run(requests)
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(prefixes, rows, results), "results": results, "seconds": seconds}
