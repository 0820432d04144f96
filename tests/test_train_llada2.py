"""Block-diffusion training of the tiny LLaDA 2.x (``train/train_llada2.py``): the converted
starting point is ``tiny-llada``'s function, and one forward over ``[noisy | clean]`` gives
every noisy block what generation computes for it (its clean past, block-causal)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.model.checkpoint import load_model
from illada_batch.train.train_llada2 import TINY_LLADA, block_diffusion_mask, init_from_llada


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return load_model(init_from_llada(TINY_LLADA, tmp_path_factory.mktemp("llada2")), device="cpu")


def test_converted_weights_compute_tiny_llada(converted):
    src = load_model(TINY_LLADA, device="cpu")
    x = torch.randint(3, 2048, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), src(x), atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(L=st.integers(1, 40), block=st.sampled_from([1, 4, 8, 16]), pad=st.integers(0, 5), seed=st.integers(0, 99))
def test_each_noisy_block_sees_what_generation_shows_it(converted, L, block, pad, seed):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 2048, (1, L + pad), generator=g)
    noisy = torch.where(torch.rand((1, L + pad), generator=g) < 0.5, 2, clean)
    valid = torch.arange(L + pad)[None] < L
    both = torch.cat([noisy, clean], 1)
    positions = torch.arange(L + pad).repeat(2)[None]
    with torch.no_grad():
        trained = converted.run(both, attention_mask=block_diffusion_mask(valid, block), positions=positions,
                                return_logits=False).hidden[0, :L]
        for k in range(0, L, block):
            end = min(L, k + block)
            seq = torch.cat([clean[:, :k], noisy[:, k:end]], 1)  # its clean past, then the block being denoised
            blk = torch.arange(end) // block
            causal = (blk[:, None] >= blk[None, :])[None]
            alone = converted.run(seq, attention_mask=causal, return_logits=False).hidden[0, k:end]
            torch.testing.assert_close(trained[k:end], alone, atol=1e-4, rtol=1e-4)


def test_the_recipe_writes_a_loadable_block_causal_checkpoint_and_its_log(tmp_path):
    from illada_batch.train import train_llada2

    out = tmp_path / "run"
    train_llada2.main(["--out", str(out), "--steps", "2", "--eval-every", "2", "--eval-rows", "5", "--batch-size", "2"])
    model = load_model(out)
    assert model.card.family == "llada2" and model.card.attention.name == "BLOCK_CAUSAL"
    assert [e["step"] for e in json.loads((out / "train_log.json").read_text())["log"]] == [0, 2]
