"""The diffusion sampler against a slow, obviously-correct oracle of LLaDA's ``generate()``.

The oracle below is written from the algorithm's description (LLaDA paper, Appendix B, and
the Sampler parity contract in DESIGN.md): one row at a time, no padding, plain Python loops,
one ``model(ids[None])`` call per forward pass. ``illada_batch.generate`` on a left-padded
batch must pick the same tokens, row by row, at temperature 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracle import left_pad, make_prompts, oracle_generate

from illada_batch import generate
from illada_batch.decoding.params import ParamsError
from illada_batch.model.llada import LLaDA

torch.set_num_threads(1)

# (steps, gen_length, block_length); the last two have uneven schedules (M % s != 0: 4,3,3 and 4,3,3,3,3)
SETTINGS = [(8, 8, 8), (8, 16, 4), (16, 16, 8), (4, 16, 16), (12, 24, 8), (6, 20, 10), (5, 16, 16)]
PROMPT_LENGTHS = [5, 2, 9, 6]  # different lengths: the batch is left padded


def count_forward_passes(model, monkeypatch):
    """Record the input ids of every ``model.run`` call (one call = one forward pass)."""
    calls = []
    run = model.run

    def counting_run(input_ids, *args, **kwargs):
        calls.append(input_ids.clone())
        return run(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "run", counting_run)
    return calls


@pytest.fixture(scope="module")
def models(make_tiny_llada):
    return {"gqa": make_tiny_llada(seed=1, n_kv_heads=2), "mha": make_tiny_llada(seed=2, n_kv_heads=4)}


@pytest.fixture(scope="module")
def oracle(models):
    cache = {}

    def run(arch, prompt, *args, **kwargs):
        key = (arch, tuple(prompt), args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = oracle_generate(models[arch], prompt, *args, **kwargs)
        return cache[key]

    return run


def prompts_for(model, seed=0, lengths=PROMPT_LENGTHS):
    cfg = model.config
    prompts = make_prompts(lengths, seed, cfg.vocab_size - 1, cfg.mask_token_id)
    assert all(cfg.mask_token_id not in p for p in prompts)
    return prompts


# --- greedy parity -------------------------------------------------------------------------


def test_oracle_sanity(models, oracle):
    """The oracle itself: every position filled, tokens fixed once unmasked, the schedule's counts."""
    model = models["gqa"]
    mask_id = model.config.mask_token_id
    prompt = prompts_for(model)[0]
    response, states = oracle("gqa", prompt, 12, 24, 8)
    assert len(states) == 12 and len(response) == 24 and mask_id not in response
    masked_before = 24
    for t, state in enumerate(states):
        masked = state.count(mask_id)
        assert masked_before - masked == (8 // 4 + (1 if t % 4 < 8 % 4 else 0))  # M=8, s=4: 2 per step
        block = t // 4
        assert all(tok != mask_id for tok in state[: block * 8])  # earlier blocks are complete
        assert all(tok == mask_id for tok in state[(block + 1) * 8:])  # later blocks untouched
        masked_before = masked
    uneven, states = oracle("gqa", prompt, 3, 8, 8)  # M=8, s=3 -> 3, 3, 2
    assert [8 - s.count(mask_id) for s in states] == [3, 6, 8]


@pytest.mark.parametrize("steps,gen_length,block_length", SETTINGS)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_greedy_batch_matches_oracle(models, oracle, arch, steps, gen_length, block_length, cfg_scale):
    model = models[arch]
    prompts = prompts_for(model, seed=steps + gen_length)
    prompt_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    out = generate(model, prompt_ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                   block_length=block_length, temperature=0.0, cfg_scale=cfg_scale)
    assert out.shape == (len(prompts), prompt_ids.shape[1] + gen_length)
    assert torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
    for i, prompt in enumerate(prompts):
        expected, _ = oracle(arch, prompt, steps, gen_length, block_length, cfg_scale=cfg_scale)
        assert out[i, -gen_length:].tolist() == expected, f"row {i} (prompt length {len(prompt)})"


@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_block_logits_equal_full_logits_on_the_block(models, arch):
    """The loop computes logits for the current block only (``logits_index``): the oracle
    computes them everywhere; on the block's positions both are the same numbers."""
    model = models[arch]
    prompt_ids, attention_mask = left_pad(prompts_for(model, seed=8), model.config.pad_token_id)
    x = torch.cat([prompt_ids, torch.full((len(prompt_ids), 16), model.config.mask_token_id)], dim=1)  # [B, L]
    valid = torch.cat([attention_mask.bool(), torch.ones(len(x), 16, dtype=torch.bool)], dim=1)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cols = x.shape[1] - 16 + 4 + torch.arange(8).expand(len(x), 8)  # [B, 8] a block inside the response
    with torch.no_grad():
        full = model.run(x, attention_mask=valid, positions=positions).logits  # [B, L, V]
        block = model.run(x, attention_mask=valid, positions=positions, logits_index=cols).logits  # [B, 8, V]
    torch.testing.assert_close(block, full.gather(1, cols[..., None].expand(-1, -1, full.shape[-1])))


def test_greedy_single_row_without_attention_mask(models, oracle):
    model = models["gqa"]
    prompt = prompts_for(model)[2]
    out = generate(model, torch.tensor([prompt]), steps=16, gen_length=16, block_length=8)
    assert out[0, len(prompt):].tolist() == oracle("gqa", prompt, 16, 16, 8)[0]


def test_cfg_changes_the_result(models, oracle):
    """Guard for the parity test: with these models CFG does change some tokens, so a sampler
    that ignored cfg_scale could not pass the cfg cases."""
    prompts = prompts_for(models["gqa"], seed=32)
    differs = [oracle("gqa", p, 16, 16, 8)[0] != oracle("gqa", p, 16, 16, 8, cfg_scale=1.5)[0] for p in prompts]
    assert any(differs)


# --- early stop ----------------------------------------------------------------------------


def oracle_early_stop(states, eos, mask_id):
    """What early stopping makes of the oracle's trajectory: the row stops after the first pass
    whose state has an EOS with no mask before it, its remaining masks become EOS.
    -> (response, forward passes)."""
    for t, state in enumerate(states):
        if eos in state and mask_id not in state[: state.index(eos)]:
            return [eos if tok == mask_id else tok for tok in state], t + 1
    return states[-1], len(states)


def early_stop_case(base, steps=16, gen_length=16, block_length=8):
    """Oracle runs for a batch, and a copy of ``base`` whose EOS is a token that row 0 produces
    early (the oracle never looks at eos_token_id, so its runs stay valid for the copy)."""
    prompts = prompts_for(base, seed=5)
    runs = [oracle_generate(base, p, steps, gen_length, block_length) for p in prompts]
    eos = runs[0][0][gen_length // 4]
    model = LLaDA(dataclasses.replace(base.config, eos_token_id=eos)).eval()
    model.load_state_dict(base.state_dict())
    return prompts, runs, eos, model


def test_early_stop_matches_oracle_up_to_first_eos(models, monkeypatch):
    steps, gen_length, block_length = 16, 16, 8
    prompts, runs, eos, model = early_stop_case(models["gqa"], steps, gen_length, block_length)
    mask_id = model.config.mask_token_id
    prompt_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    out = generate(model, prompt_ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                   block_length=block_length, early_stop=True)
    stopped_early = 0
    for i, (full, states) in enumerate(runs):
        got = out[i, -gen_length:].tolist()
        assert mask_id not in got
        if eos not in full:
            assert got == full, f"row {i}: no EOS, so no early stop"
            continue
        cut = full.index(eos) + 1
        assert got[:cut] == full[:cut], f"row {i}: the text up to the first EOS is the oracle's"
        assert all(g in (eos, f) for g, f in zip(got[cut:], full[cut:])), f"row {i}"
        expected, _ = oracle_early_stop(states, eos, mask_id)
        assert got == expected, f"row {i}"
        stopped_early += got != full
    assert stopped_early >= 1, "test setup: early stopping must change some row"

    # Row 0 alone costs exactly the passes until its text up to the first EOS is final.
    expected, passes = oracle_early_stop(runs[0][1], eos, mask_id)
    assert passes < steps
    calls = count_forward_passes(model, monkeypatch)
    out = generate(model, torch.tensor([prompts[0]]), steps=steps, gen_length=gen_length,
                   block_length=block_length, early_stop=True)
    assert out[0, len(prompts[0]):].tolist() == expected
    assert len(calls) == passes


def test_early_stop_leaves_only_eos_after_the_first_eos(make_tiny_llada):
    steps, gen_length, block_length = 16, 16, 8
    prompts, runs, eos, model = early_stop_case(make_tiny_llada(seed=31, n_kv_heads=2), steps, gen_length,
                                                block_length)
    prompt_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    out = generate(model, prompt_ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                   block_length=block_length, early_stop=True)
    for i, (full, _) in enumerate(runs):
        got = out[i, -gen_length:].tolist()
        if eos in full:
            cut = full.index(eos) + 1
            assert got[:cut] == full[:cut], f"row {i}"
            assert got[cut:] == [eos] * (gen_length - cut), f"row {i}: after the first EOS, only EOS"


# --- confidence threshold -------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.9, 0.5])
def test_threshold_decoding(models, oracle, monkeypatch, threshold):
    """At least one token per forward pass, at most steps (= gen_length) passes, every position
    filled, and the same tokens as the oracle's threshold rule."""
    model = models["gqa"]
    mask_id = model.config.mask_token_id
    steps, gen_length, block_length = 16, 16, 8
    prompts = prompts_for(model, seed=9)
    for prompt in prompts:
        expected, states = oracle("gqa", prompt, steps, gen_length, block_length, threshold=threshold)
        calls = count_forward_passes(model, monkeypatch)  # after the oracle, whose passes are not counted
        out = generate(model, torch.tensor([prompt]), steps=steps, gen_length=gen_length,
                       block_length=block_length, threshold=threshold)
        response = out[0, len(prompt):].tolist()
        assert mask_id not in response
        assert 1 <= len(calls) <= steps
        masked = [int((c[0, -gen_length:] == mask_id).sum()) for c in calls]  # masks seen by each pass
        assert masked[0] == gen_length
        assert all(a > b for a, b in zip(masked, masked[1:])), f"a pass unmasked nothing: {masked}"
        monkeypatch.undo()
        assert response == expected
        assert len(calls) == len(states)


def test_threshold_decodes_in_parallel(models, monkeypatch):
    """A threshold every prediction passes fills a whole block per forward pass."""
    model = models["gqa"]
    prompt = prompts_for(model)[0]
    calls = count_forward_passes(model, monkeypatch)
    out = generate(model, torch.tensor([prompt]), steps=16, gen_length=16, block_length=8, threshold=1e-9)
    assert model.config.mask_token_id not in out[0].tolist()
    assert len(calls) == 2


# --- temperature > 0, seeds, random remasking --------------------------------------------------


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampling_row_is_independent_of_its_batch(models, remasking):
    model = models["gqa"]
    prompts = prompts_for(model, seed=3, lengths=[4, 8, 6])
    prompt_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0, remasking=remasking)
    seeds = [11, 22, 33]
    batch = generate(model, prompt_ids, attention_mask=attention_mask, seed=seeds, **kw)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = generate(model, torch.tensor([prompt]), seed=[seed], **kw)
        assert batch[i, -16:].tolist() == alone[0, -16:].tolist(), f"row {i}"
    # a row's output follows its seed, not its place in the batch
    swapped = generate(model, prompt_ids[[1, 0]], attention_mask=attention_mask[[1, 0]], seed=[22, 11], **kw)
    assert torch.equal(swapped[0, -16:], batch[1, -16:]) and torch.equal(swapped[1, -16:], batch[0, -16:])
    # one scalar seed: row i gets seed + i
    assert torch.equal(generate(model, prompt_ids, attention_mask=attention_mask, seed=[5, 6, 7], **kw),
                       generate(model, prompt_ids, attention_mask=attention_mask, seed=5, **kw))


def test_sampling_seeds_matter(models):
    model = models["gqa"]
    prompt = torch.tensor([prompts_for(model)[0]])
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0)
    a = generate(model, prompt, seed=[1], **kw)
    assert torch.equal(a, generate(model, prompt, seed=[1], **kw))  # reproducible
    others = [generate(model, prompt, seed=[s], **kw) for s in (2, 3, 4)]
    assert all(not torch.equal(a, b) for b in others)
    assert model.config.mask_token_id not in a[0].tolist()
    # temperature > 0 is not greedy
    greedy = generate(model, prompt, steps=8, gen_length=16, block_length=8, temperature=0.0)
    assert any(not torch.equal(greedy, b) for b in [a, *others])


def test_random_remasking_fills_every_position(models):
    model = models["mha"]
    mask_id = model.config.mask_token_id
    prompts = prompts_for(model, seed=4)
    prompt_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    outs = [generate(model, prompt_ids, attention_mask=attention_mask, steps=8, gen_length=16, block_length=4,
                     remasking="random", seed=[s, s + 1, s + 2, s + 3]) for s in (0, 100)]
    for out in outs:
        assert torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
        response = out[:, -16:]
        assert not (response == mask_id).any()
        assert ((response >= 0) & (response < model.config.embedding_size)).all()
    # the unmasking order is random, so the greedy tokens differ between seeds somewhere
    assert not torch.equal(outs[0], outs[1])


# --- invalid parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,names", [
    (dict(steps=4, gen_length=12, block_length=8), ["gen_length", "block_length"]),
    (dict(steps=6, gen_length=16, block_length=4), ["steps", "blocks"]),
    (dict(steps=32, gen_length=16, block_length=16), ["steps", "gen_length"]),
    (dict(steps=0, gen_length=16, block_length=16), ["steps"]),
    (dict(steps=4, gen_length=16, block_length=16, temperature=-1.0), ["temperature"]),
    (dict(steps=4, gen_length=16, block_length=16, threshold=1.5), ["threshold"]),
])
def test_invalid_parameters_are_refused_by_name(models, monkeypatch, kwargs, names):
    model = models["gqa"]
    calls = count_forward_passes(model, monkeypatch)
    with pytest.raises(ParamsError) as err:
        generate(model, torch.tensor([[3, 4, 5]]), **kwargs)
    for name in names:
        assert name in str(err.value)
    assert calls == []  # refused before any work


def test_invalid_remasking_is_refused(models):
    with pytest.raises(ValueError, match="bogus"):
        generate(models["gqa"], torch.tensor([[3, 4, 5]]), steps=4, gen_length=8, block_length=8, remasking="bogus")
