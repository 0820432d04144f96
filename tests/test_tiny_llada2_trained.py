"""The shipped trained tiny LLaDA 2.x (``illada_batch/models/tiny-llada2``, trained with block
diffusion by ``train/train_llada2.py``): it loads as the block-causal family and, at
temperature 0 under threshold decoding, solves task-suite rows through the exact cache with
the same tokens as the cache off, fixing more than one token per step."""

from __future__ import annotations

import pytest

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.model.checkpoint import load_model
from illada_batch.model.family import AttentionKind
from illada_batch.tasks import suite as tasks
from illada_batch.tasks.evaluate import evaluate, suite_rows


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llada2", device="cpu")  # shipped: found by name


def test_loads_as_the_block_causal_family(model):
    assert model.card.family == "llada2"
    assert model.card.attention is AttentionKind.BLOCK_CAUSAL


@pytest.mark.parametrize("task", ["reverse", "rotate", "double"])
def test_solves_rows_through_the_exact_cache_as_with_the_cache_off(model, task):
    prefixes, rows = suite_rows(model.tokenizer, seed=10_000, rows_per_task=3, prefixes_per_task=1,
                                min_prefix_tokens=120, task_names=(task,))
    params = SamplingParams(steps=32, gen_length=32, block_length=32, threshold=0.9)
    off, exact = (evaluate(Engine(model, cache=cache, max_batch_size=4), prefixes, rows, params)
                  for cache in ("off", "auto"))
    assert [r.token_ids for r in exact["results"]] == [r.token_ids for r in off["results"]]
    solved = [tasks.check(r.task, prefixes[r.prefix_id], r.prompt, res.text) for r, res in zip(rows, exact["results"])]
    assert sum(solved) >= 2, [res.text for res in exact["results"]]
    assert sum(res.steps for res in exact["results"]) < 32 * len(rows)  # threshold decoding fixes several tokens a step
