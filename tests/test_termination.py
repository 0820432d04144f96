"""A row always finishes: [MASK] is never an output, and a block ends after its scheduled
steps (a threshold: at most block_length steps) whatever the model says.

The models here are broken on purpose: one predicts [MASK] at every masked position (its
mask embedding and the head's mask row point the same, huge way), one gives NaN logits.
Before the fix the first hung the engine: the position kept its mask and the block never
ended.
"""

from __future__ import annotations

import random

import pytest
import torch

from illada_batch import generate
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.diffusion import Engine, Request

PARAMS = {
    "fixed": SamplingParams(steps=8, gen_length=32, block_length=16),
    "threshold": SamplingParams(steps=32, gen_length=32, block_length=16, threshold=0.9),
    "temperature": SamplingParams(steps=16, gen_length=32, block_length=16, temperature=1.0, early_stop=True),
}


@pytest.fixture(scope="module")
def mask_model(make_tiny_llada):
    model = make_tiny_llada(seed=3)
    cfg = model.config
    with torch.no_grad():
        e = torch.zeros(cfg.d_model)
        e[0] = 1.0
        model.model.transformer.wte.weight[cfg.mask_token_id] = 100.0 * e
        model.model.transformer.ln_f.weight.abs_()
        model.model.transformer.ff_out.weight[cfg.mask_token_id] = 100.0 * e
    return model


@pytest.fixture(scope="module")
def nan_model(make_tiny_llada):
    model = make_tiny_llada(seed=4)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.fill_(float("nan"))
    return model


def requests(model, params: SamplingParams, n: int = 6) -> list[Request]:
    rng = random.Random(0)
    V = model.config.mask_token_id  # ordinary ids are below it in these models
    prefix = tuple(rng.randrange(3, V) for _ in range(20))
    return [Request(f"r{i}", tuple(rng.randrange(3, V) for _ in range(3 + i)), prefix, params, seed=i) for i in range(n)]


def test_the_mask_model_really_predicts_mask(mask_model):
    cfg = mask_model.config
    ids = torch.tensor([[5, 6, 7] + [cfg.mask_token_id] * 8])
    with torch.no_grad():
        assert (mask_model(ids)[0, 3:].argmax(-1) == cfg.mask_token_id).all()


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("cache", CacheMode.concrete())
def test_a_model_that_predicts_mask_still_finishes_every_row(cache, name, mask_model):
    params = PARAMS[name]
    results = Engine(mask_model, cache=cache, max_batch_size=4).run(requests(mask_model, params))
    mask_id = mask_model.config.mask_token_id
    for r in results:
        assert r.error is None and r.finish_reason in ("eos", "length")
        assert mask_id not in r.token_ids
        assert r.steps <= (params.steps if params.threshold is None else params.gen_length)
        if name == "fixed":
            assert r.steps == params.steps or r.finish_reason == "eos"


@pytest.mark.parametrize("name", ["fixed", "threshold"])
@pytest.mark.parametrize("cache", CacheMode.concrete())
def test_a_block_ends_after_its_scheduled_steps_even_with_nan_logits(cache, name, nan_model):
    params = PARAMS[name]
    results = Engine(nan_model, cache=cache, max_batch_size=4).run(requests(nan_model, params, n=3))
    bound = params.steps if params.threshold is None else params.gen_length
    assert all(r.steps <= bound and nan_model.config.mask_token_id not in r.token_ids for r in results)


def test_generate_fills_every_position_of_a_mask_predicting_model(mask_model):
    out = generate(mask_model, torch.tensor([[5, 6, 7, 8]]), steps=8, gen_length=16, block_length=8)
    assert mask_model.config.mask_token_id not in out[0].tolist()
