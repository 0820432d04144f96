"""LLaDA-MoE on its tiny random checkpoint (``family_checkpoint("llada-moe")``: the real
config.json field names and tensor names; a dense first layer, two MoE layers with 8
experts top-2, expert bias, a shared expert, q/k norm, partial rotary, GQA):

- logits equal a slow float64 oracle written from the architecture's definition;
- the experts' three compute paths (per-expert gather, padded bmm, torch._grouped_mm) agree,
  for any routing (softmax or sigmoid, bias in the weights or selection only, groups);
- at temperature 0 the sampler picks the tokens of LLaDA's reference ``generate()``;
- every cache mode runs it (the block cache against its DualCache oracle).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import left_pad, oracle_generate
from oracle_llada_moe import oracle_logits
from safetensors.torch import load_file
from test_block_cache import (  # noqa: F401  (run on this model: GQA)
    test_a_block_only_step_copies_no_row_cache,
    test_block_only_forward_equals_the_full_forward,
    test_paged_attention_logits_equal_the_gathered_path_for_any_batch_mix,
)

from illada_batch import generate
from illada_batch.engine.diffusion import Engine
from illada_batch.model.checkpoint import load_model
from illada_batch.model.layers.moe import Experts, RouterSpec, Score, route

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(family_checkpoint):
    m = load_model(family_checkpoint("llada-moe"), device="cpu", dtype=torch.float32)
    with torch.no_grad():  # own, aligned copies: memory-mapped weights moved MoE logits ~1e-5
        for p in m.parameters():
            p.data = p.data.clone()
    return m


def prompts(seed: int, lengths, model) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, model.card.vocab_size) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("length", [1, 7, 19])
def test_logits_equal_the_oracle(model, family_checkpoint, length):
    weights = {k: v.clone() for k, v in load_file(str(family_checkpoint("llada-moe") / "model.safetensors")).items()}
    ids = prompts(length, [length], model)[0]
    want = oracle_logits(model.config, weights, ids)  # [L, V] float64
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_part_of_the_layer_moves_the_logits(model, family_checkpoint):
    """The oracle would not notice a part both of them skipped: each configured part matters."""
    weights = {k: v.clone() for k, v in load_file(str(family_checkpoint("llada-moe") / "model.safetensors")).items()}
    ids = prompts(3, [9], model)[0]
    base = oracle_logits(model.config, weights, ids)
    for name in ("model.layers.1.mlp.expert_bias", "model.layers.1.self_attn.q_norm.weight",
                 "model.layers.2.shared_expert.down_proj.weight"):
        changed = dict(weights, **{name: weights[name] * 0})
        assert not torch.allclose(oracle_logits(model.config, changed, ids), base, atol=1e-3), name


def brute_route(logits, spec: RouterSpec, bias):
    """One token at a time, from the rules' words."""
    out_w, out_i = [], []
    for row in logits.double():
        p = row.softmax(-1) if spec.score is Score.SOFTMAX else row.sigmoid()
        s = p + (0 if bias is None else bias.double())
        allowed = set(range(spec.num_experts))
        if spec.n_group > 1:
            size = spec.num_experts // spec.n_group
            gs = [sum(sorted(s[g * size:(g + 1) * size].tolist())[-2:]) for g in range(spec.n_group)]
            keep = sorted(range(spec.n_group), key=lambda g: -gs[g])[:spec.topk_group]
            allowed = {e for e in allowed if e // size in keep}
        top = sorted(allowed, key=lambda e: -float(s[e]))[:spec.top_k]
        w = [float((s if spec.bias_in_weights else p)[e]) for e in top]
        if spec.renormalize and spec.top_k > 1:
            w = [x / sum(w) for x in w]
        out_w.append([x * spec.scaling for x in w])
        out_i.append(top)
    return torch.tensor(out_w), torch.tensor(out_i)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 12), groups=st.sampled_from([(1, 1), (2, 1), (4, 2)]), top_k=st.integers(1, 3),
       score=st.sampled_from(list(Score)), bias_in_weights=st.booleans(), renormalize=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_routing_and_the_three_expert_paths_agree(tokens, groups, top_k, score, bias_in_weights, renormalize,
                                                   with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    spec = RouterSpec(num_experts=8, top_k=top_k, score=score, bias_in_weights=bias_in_weights,
                      renormalize=renormalize, scaling=1.5, n_group=groups[0], topk_group=groups[1])
    logits = torch.randn(tokens, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.1 if with_bias else None
    weights, ids = route(logits, spec, bias)
    want_w, want_i = brute_route(logits, spec, bias)
    assert ids.tolist() == want_i.tolist()
    torch.testing.assert_close(weights.double(), want_w.double(), rtol=1e-5, atol=1e-6)
    torch.manual_seed(seed)
    experts = Experts(8, 16, 24)
    x = torch.randn(tokens, 16, generator=g)
    with torch.no_grad():
        loop = experts(x, weights, ids, path="loop")
        for path in ("bmm", "grouped_mm"):
            torch.testing.assert_close(experts(x, weights, ids, path=path), loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps,gen_length,block_length,threshold", [(8, 16, 8, None), (6, 12, 12, None),
                                                                     (16, 16, 4, 0.3)])
def test_greedy_generate_matches_the_reference_sampler(model, steps, gen_length, block_length, threshold):
    rows = prompts(steps, [5, 2, 9], model)
    prompt_ids, attention_mask = left_pad(rows, model.card.pad_token_id)
    extra = {} if threshold is None else {"threshold": threshold}
    out = generate(model, prompt_ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                   block_length=block_length, temperature=0.0, early_stop=False, **extra)
    for i, prompt in enumerate(rows):
        want, _ = oracle_generate(model, prompt, steps, gen_length, block_length, threshold=threshold)
        assert out[i, -gen_length:].tolist() == want, f"row {i}"


@pytest.mark.parametrize("cache", ["off", "prefix", "blocks", "prefix+blocks"])
def test_every_cache_mode_generates_every_row(model, cache):
    from illada_batch.decoding.params import SamplingParams
    from illada_batch.engine.requests import Request

    params = SamplingParams(steps=8, gen_length=16, block_length=8, early_stop=False)
    prefix = tuple(prompts(1, [20], model)[0])
    reqs = [Request(f"r{i}", tuple(p), prefix, params) for i, p in enumerate(prompts(2, [3, 8, 5], model))]
    got = Engine(model, cache=cache, max_batch_size=2).run(reqs)
    assert [r.request_id for r in got] == ["r0", "r1", "r2"]
    assert all(len(r.token_ids) == 16 and model.card.mask_token_id not in r.token_ids for r in got)
    if cache == "off":
        for req, res in zip(reqs, got):
            want, _ = oracle_generate(model, list(prefix + req.prompt_ids), 8, 16, 8)
            assert res.token_ids == want
