"""LLaDA 2.x: the model against the slow architecture oracle (float64, one token and one
query at a time), and the one decoding loop against the reference sampler's semantics
(LLaDA 2.0 threshold with its block schedule, LLaDA 2.1 editing), on a tiny random
checkpoint in the real Hugging Face layout, at temperature 0, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.decoding.loop import generate
from illada_batch.errors import ConfigError
from illada_batch.model.checkpoint import load_model
from illada_batch.model.family import AttentionKind
from illada_batch.model.registry import parse
from illada_batch.train.tiny_llada2 import write_tiny_llada2
from tests.llada2_oracle import Llada2Oracle, oracle_generate_llada2
from tests.oracle import make_prompts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llada2(tmp_path_factory.mktemp("tiny-llada2"))


@pytest.fixture(scope="module")
def model(checkpoint):
    m = load_model(checkpoint, device="cpu", dtype=torch.float32)
    for p in m.parameters():  # memory-mapped safetensors can be misaligned: copy before tight comparisons
        p.data = p.data.clone()
    return m


def block_causal(L: int, block: int) -> torch.Tensor:
    pos = torch.arange(L)
    return (pos[None, :] // block <= pos[:, None] // block)[None]  # [1, L, L]


def test_card_says_block_causal_and_config_ids(model):
    card = model.card
    assert card.attention is AttentionKind.BLOCK_CAUSAL
    assert (card.mask_token_id, card.eos_token_id) == (2, 1)  # the config's, not 156895 / 156892
    assert card.active_parameters < card.parameters


@pytest.mark.parametrize("block", [4, None])
def test_logits_match_the_architecture_oracle(model, checkpoint, block):
    ids = make_prompts([11], seed=3, vocab_size=2048, mask_id=2)[0] + [2] * 5  # prompt and masks
    oracle = Llada2Oracle(checkpoint).logits(ids, block)  # [L, V] float64
    mask = None if block is None else block_causal(len(ids), block)
    got = model.run(torch.tensor(ids)[None], attention_mask=mask).logits[0].double()
    assert torch.allclose(got, oracle, atol=2e-4, rtol=1e-4), float((got - oracle).abs().max())


def test_block_causal_mask_hides_later_blocks(model):
    ids = make_prompts([12], seed=4, vocab_size=2048, mask_id=2)[0]
    changed = ids[:8] + [5, 6, 7, 9]  # only the last block differs
    mask = block_causal(12, 4)
    a = model.run(torch.tensor(ids)[None], attention_mask=mask).logits[0, :8]
    b = model.run(torch.tensor(changed)[None], attention_mask=mask).logits[0, :8]
    assert torch.allclose(a, b, atol=1e-5)  # the fused kernel may round differently; no dependence


def _logits_of(model, block):
    def logits_of(ids):
        with torch.no_grad():
            return model.run(torch.tensor(ids)[None], attention_mask=block_causal(len(ids), block)).logits[0]
    return logits_of


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 13), min_size=1, max_size=3), block=st.sampled_from([2, 4, 8]),
       blocks=st.integers(1, 3), steps_per_block=st.integers(1, 4),
       threshold=st.sampled_from([None, 0.05, 0.2, 0.6]), editing=st.sampled_from([None, 0.1, 0.5]),
       max_post=st.integers(0, 3), seed=st.integers(0, 99))
def test_sampler_matches_the_reference_semantics(model, lengths, block, blocks, steps_per_block, threshold, editing,
                                                 max_post, seed):
    """Rows of mixed prompt lengths (so each row's blocks start at its own offset in the
    window) in one batch; each row against the one-row oracle of the reference sampler."""
    spb = min(steps_per_block, block)
    G = block * blocks
    prompts = make_prompts(lengths, seed, 2048, 2)
    ids = torch.full((len(prompts), max(lengths)), 1)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):], attn[i, ids.shape[1] - len(p):] = torch.tensor(p), 1
    extra = {} if editing is None else {"editing_threshold": editing, "max_post_steps": max_post}
    out = generate(model, ids, attention_mask=attn, steps=spb * blocks, gen_length=G, block_length=block,
                   threshold=threshold, transfer_rule="block_schedule", early_stop=True, seed=0, **extra)
    for i, p in enumerate(prompts):
        want = oracle_generate_llada2(_logits_of(model, block), p, G, block, spb, threshold, mask_id=2, eos_id=1,
                                      editing_threshold=editing, max_post_steps=max_post)
        got = out[i, ids.shape[1]:].tolist()
        got = got[:got.index(1)] if 1 in got else got
        assert got == want, (i, p)


@pytest.mark.parametrize("field,value,named", [
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("partial_rotary_factor", 1.5, "partial_rotary_factor"),
    ("topk_group", 3, "topk_group"),
])
def test_self_contradicting_config_is_refused_by_field(tmp_path, field, value, named):
    d = write_tiny_llada2(tmp_path / "bad", **{field: value})
    with pytest.raises(ConfigError, match=named):
        parse(d / "config.json")


def test_config_json_uses_the_reference_field_names(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    assert raw["model_type"] == "llada2_moe"
    family, cfg = parse(checkpoint / "config.json")
    assert family.name == "llada2" and cfg.first_k_dense_replace == 1 and cfg.n_group == 2


def test_engine_generates_text_with_the_cache_off(model):
    """The engine's batch (rows of different prompt lengths, continuous batching) gives each
    row the tokens generate() gives it alone."""
    from illada_batch.decoding.params import SamplingParams
    from illada_batch.engine.diffusion import Engine

    params = SamplingParams(steps=8, gen_length=16, block_length=4, threshold=0.3, transfer_rule="block_schedule",
                            editing_threshold=0.5, max_post_steps=2)
    prompts = ["a b c", "the quick brown fox jumps", "x"]
    together = Engine(model, cache="off", max_batch_size=2).generate(prompts, params)
    alone = [Engine(model, cache="off").generate([p], params)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(r.finish_reason in ("eos", "length") for r in together)
