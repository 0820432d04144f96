"""``engine.cache: auto``, the default everywhere (``EngineSpec``, ``Engine``, the CLI, Ray
Data): it resolves once, from the model's family card, to the exact block-causal cache for
block-causal families (LLaDA 2.x) and to ``prefix`` for bidirectional ones; the engine, the
job's summary and card, ``validate`` and ``generate`` say what it resolved to. Tokens on
the tiny LLaDA 2.x checkpoint equal the cache-off loop's on every path."""

from __future__ import annotations

import pytest
import torch

from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.job.spec import EngineSpec, spec_from_dict
from illada_batch.model.checkpoint import load_model
from illada_batch.model.registry import card_of

FAMILIES = ["llada", "llada-moe", "llada2", "dream"]
PROMPTS = ["Input: lamb king\nOutput:", "Input: fire tree gold water\nOutput: water", "Input: stone\nOutput:"]
SAMPLING = {"steps": 8, "gen_length": 16, "block_length": 8}


@pytest.fixture(scope="module")
def llada2(family_checkpoint):
    return family_checkpoint("llada2")


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_resolves_from_the_card_and_every_other_mode_is_itself(family_checkpoint, family):
    card = card_of(family_checkpoint(family))
    block_causal = card.attention.value == "block-causal"
    assert CacheMode.AUTO.resolve(card) is (CacheMode.BLOCKS if block_causal else CacheMode.PREFIX)
    assert CacheMode.AUTO.describe(card) == ("auto -> blocks (exact block-causal cache)" if block_causal
                                             else "auto -> prefix")
    assert CacheMode.AUTO not in CacheMode.concrete()
    assert set(CacheMode.concrete()) | {CacheMode.AUTO} == set(CacheMode)
    for mode in CacheMode.concrete():
        assert mode.resolve(card) is mode


def test_auto_is_the_default_of_the_spec_the_engine_and_the_cli():
    import inspect

    from illada_batch.cli import build_parser

    assert EngineSpec().cache is CacheMode.AUTO
    for f in (Engine.__init__, Engine.from_pretrained):
        assert inspect.signature(f).parameters["cache"].default is CacheMode.AUTO
    assert build_parser().parse_args(["generate", "--prompt", "p"]).cache == "auto"
    assert build_parser().parse_args(["eval", "--cache", "auto"]).cache == "auto"  # eval keeps off, its reference


@pytest.mark.parametrize("family", ["llada", "llada2"])  # a bidirectional card and a block-causal one
def test_the_default_engine_runs_the_resolved_mode_with_the_cache_offs_tokens(family_checkpoint, family):
    """LLaDA 2.x: the exact block-causal cache (fewer query tokens, pages read), the same
    tokens as the cache off; the bidirectional families: ``prefix``, as before."""
    model = load_model(family_checkpoint(family), device="cpu", dtype=torch.float32)
    engine = Engine(model, max_batch_size=2, kv_budget=2**22)
    assert engine.cache is CacheMode.AUTO.resolve(model.card) and engine.requested_cache is CacheMode.AUTO
    params = SamplingParams(**SAMPLING)
    got = [r.token_ids for r in engine.generate(PROMPTS, params)]
    off = Engine(model, cache="off", max_batch_size=2)
    assert got == [r.token_ids for r in off.generate(PROMPTS, params)]
    assert engine.block_causal == (family == "llada2")
    if family == "llada2":
        assert engine.counters.query_tokens < off.counters.query_tokens
        assert "exact block-causal cache" in engine.cache_text


def test_generate_cli_runs_llada2_on_the_exact_cache_with_the_loops_tokens(llada2, capsys):
    """Before: ``illada-batch generate`` always ran the no-cache loop. Now it runs the engine
    with the resolved cache (here the exact block-causal one); the text is the loop's."""
    from illada_batch.cli import main
    from illada_batch.decoding.loop import generate

    prompt = "Input: fire tree gold\nOutput:"
    args = ["--steps", "8", "--gen-length", "16", "--block-length", "8"]
    assert main(["generate", "--model", str(llada2), "--prompt", prompt, *args]) == 0
    out, err = capsys.readouterr()
    assert "cache auto -> blocks (exact block-causal cache)" in err
    model = load_model(llada2, device="cpu")
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    resp = generate(model, ids, steps=8, gen_length=16, block_length=8, early_stop=True, seed=0)[0, ids.shape[1]:]
    resp = resp.tolist()
    resp = resp[:resp.index(model.card.eos_token_id)] if model.card.eos_token_id in resp else resp
    assert out.rstrip("\n") == model.tokenizer.decode(resp, skip_special_tokens=True)
    assert main(["generate", "--model", str(llada2), "--prompt", prompt, "--cache", "off", *args]) == 0
    off_out, off_err = capsys.readouterr()
    assert off_out == out and "cache off" in off_err


def test_fingerprint_records_the_spec_value(tmp_path):
    base = {"name": "t", "model": {"path": "tiny-llada"}, "input": {"url": str(tmp_path / "in.parquet")},
            "output": {"url": str(tmp_path / "out")}}
    default, auto = spec_from_dict(base), spec_from_dict({**base, "engine": {"cache": "auto"}})
    prefix = spec_from_dict({**base, "engine": {"cache": "prefix"}})
    assert default.engine.cache is CacheMode.AUTO and default.fingerprint() == auto.fingerprint()
    assert prefix.fingerprint() != default.fingerprint()
    assert prefix.fingerprint() == spec_from_dict({**base, "engine": {"cache": "prefix"}}).fingerprint()
