"""Tensor parallelism inside a replica (gloo on CPU, 2 ranks, one thread each): TP 2 picks
the same tokens as TP 1 at temperature 0 in every cache mode; each rank holds about half of
the weights, read as slices; a TP size that does not divide the model is refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_refusals import spec_file, validate

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.errors import CheckpointError
from illada_batch.model.checkpoint import load_model
from illada_batch.model.layers.linear import TPGroup

PROMPTS = ["hello there", "the cat sat on the", "one two three four five six seven", "x"]
PREFIX = "You answer in few words. " * 3
PARAMS = SamplingParams(gen_length=32, steps=16, block_length=16)


def _tokens(engine: Engine) -> list[list[int]]:
    try:
        return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, prefix=PREFIX, n=2, seed=3)]
    finally:
        engine.close()


@pytest.mark.parametrize("cache", ["off", "prefix", "blocks", "prefix+blocks"])
@pytest.mark.parametrize("model", ["tiny-llada", "tiny-family-llada"])
def test_two_ranks_pick_the_same_tokens_as_one(family_checkpoint, monkeypatch, model, cache):
    """Heads, KV heads (tiny-family-llada has 2 KV heads for 4 heads: one per rank), MLP
    columns and vocabulary split over 2 ranks; every rank's pool of its own KV heads' pages."""
    monkeypatch.setenv("ILLADA_THREADS", "1")
    torch.set_num_threads(1)
    path = family_checkpoint("llada") if model == "tiny-family-llada" else model
    one = _tokens(Engine.from_pretrained(path, cache=cache))
    two = _tokens(Engine.from_pretrained(path, cache=cache, tensor_parallel_size=2))
    assert two == one


@pytest.mark.parametrize("model", ["tiny-llada", "tiny-family-llada"])
def test_each_rank_holds_about_half_of_the_weights(family_checkpoint, model):
    """Counted in parameter bytes: only the norms (d floats each) are on both ranks."""
    path = family_checkpoint("llada") if model == "tiny-family-llada" else model
    whole = load_model(path, device="cpu")
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    replicated = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if "norm" in n or "ln_f" in n)
    ranks = [load_model(path, device="cpu", tp=TPGroup(r, 2)) for r in range(2)]
    held = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in ranks]
    assert sum(held) == total + replicated
    for h in held:
        assert h == (total - replicated) // 2 + replicated
        assert h <= 0.51 * total
    assert all(m.card.n_kv_heads == whole.card.n_kv_heads // 2 for m in ranks)


@given(n=st.integers(1, 5000), size=st.integers(1, 9))
def test_vocabulary_rows_are_split_without_gap_or_overlap(n, size):
    parts = [TPGroup(r, size).vocab_part(n) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert all(0 <= stop - start <= -(-n // size) for start, stop in parts)


def test_a_shard_that_does_not_divide_is_refused_when_loading(family_checkpoint):
    with pytest.raises(CheckpointError, match=r"'n_kv_heads'=2 does not divide by tensor_parallel_size=4"):
        load_model(family_checkpoint("llada"), device="cpu", tp=TPGroup(0, 4))


@pytest.mark.parametrize("family, size, words", [
    ("llada", 3, "engine.tensor_parallel_size: config.json field 'n_heads'=4 does not divide by tensor_parallel_size=3"),
    ("llada", 4, "engine.tensor_parallel_size: config.json field 'n_kv_heads'=2 does not divide by "
                 "tensor_parallel_size=4"),
    ("dream", 2, "engine.tensor_parallel_size: the dream family does not run tensor-parallel yet"),
])
def test_validate_refuses_a_tp_size_the_model_cannot_split(family_checkpoint, tmp_path, capsys, family, size, words):
    code, out = validate(spec_file(tmp_path, model={"path": str(family_checkpoint(family))},
                                   engine={"cache": "off", "tensor_parallel_size": size}), capsys=capsys)
    assert code == 1 and words in out, out


def test_validate_accepts_a_tp_size_that_divides(family_checkpoint, tmp_path, capsys):
    code, out = validate(spec_file(tmp_path, model={"path": str(family_checkpoint("llada"))},
                                   engine={"cache": "off", "tensor_parallel_size": 2}), capsys=capsys)
    assert code == 0, out
