"""Tensor parallelism inside a replica (gloo on CPU, 2 ranks, one thread each): TP 2 picks
the same tokens as TP 1 at temperature 0 in every cache mode, on the tiny checkpoint of every
family (and LLaDA 2.x with one KV head, replicated on both ranks, as LLaDA2.0-flash's 4 at TP
8), and its logits agree with TP 1's within fp32 tolerance; each rank holds about half of the
weights, read as slices; a TP size that does not divide the model is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from test_refusals import spec_file, validate

from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.tensor_parallel import free_address, join_group
from illada_batch.errors import CheckpointError
from illada_batch.model.checkpoint import load_model
from illada_batch.model.layers.linear import TPGroup
from illada_batch.train.tiny_llada2 import write_tiny_llada2

PROMPTS = ["hello there", "the cat sat on the", "one two three four five six seven", "x"]
PREFIX = "You answer in few words. " * 3
PARAMS = SamplingParams(gen_length=32, steps=16, block_length=16)
# Every family's tiny checkpoint, the shipped tiny-llada, and LLaDA 2.x with a single KV head
# (fewer KV heads than ranks: each rank holds a copy of it, ``TPGroup.kv_part``).
MODELS = ["tiny-llada", "llada", "llada-moe", "dream", "llada2", "llada2-one-kv-head"]
CACHES = [m.value for m in CacheMode]


@pytest.fixture(scope="module")
def tp_model(family_checkpoint, tmp_path_factory):
    def path(model: str):
        if model == "tiny-llada":
            return model
        if model == "llada2-one-kv-head":
            return write_tiny_llada2(tmp_path_factory.mktemp("one-kv"), num_key_value_heads=1)
        return family_checkpoint(model)
    return path


def _tokens(engine: Engine) -> list[list[int]]:
    try:
        return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, prefix=PREFIX, n=2, seed=3)]
    finally:
        engine.close()


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("model", MODELS)
def test_two_ranks_pick_the_same_tokens_as_one(tp_model, monkeypatch, model, cache):
    """Heads, KV heads, MLP columns (each expert's and shared expert's intermediate columns for
    the MoE families) and vocabulary split over 2 ranks; every rank's pool of its own KV heads'
    pages. No tie has changed between TP 1 and TP 2 on these prompts: the tokens are equal."""
    monkeypatch.setenv("ILLADA_THREADS", "1")
    torch.set_num_threads(1)
    path = tp_model(model)
    one = _tokens(Engine.from_pretrained(path, cache=cache))
    two = _tokens(Engine.from_pretrained(path, cache=cache, tensor_parallel_size=2))
    assert two == one


def _rank_logits(rank: int, size: int, init: str, path: str, ids: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, size, init, "cpu")
    model = load_model(path, device="cpu", tp=TPGroup(rank, size))
    with torch.no_grad():
        logits = model(ids)  # [B, L, V] on every rank
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("model", MODELS)
def test_two_ranks_logits_agree_with_one_within_fp32_tolerance(tp_model, tmp_path, model):
    """The whole forward (vocabulary-parallel embedding, every split layer, MoE all-reduce,
    gathered logits) of 2 ranks against 1: only the order of the sums differs."""
    path = tp_model(model)
    whole = load_model(path, device="cpu")
    ids = torch.randint(3, whole.card.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = whole(ids)
    out = tmp_path / "logits.pt"
    mp.spawn(_rank_logits, args=(2, free_address(), str(path), ids, str(out)), nprocs=2, join=True)
    two = torch.load(out)
    assert two.shape == one.shape
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)


# What every rank holds whole: norms, the MoE router (its gate and expert bias).
REPLICATED = ("norm", "ln_f", "mlp.gate.weight", "expert_bias")


@pytest.mark.parametrize("model", MODELS[:-1])
def test_each_rank_holds_about_half_of_the_weights(tp_model, model):
    """Counted in parameter bytes: only the norms (d floats each) and the router are on both
    ranks; every other tensor is split in two, experts included."""
    path = tp_model(model)
    whole = load_model(path, device="cpu")
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    replicated = sum(p.numel() * p.element_size() for n, p in whole.named_parameters()
                     if any(r in n for r in REPLICATED))
    ranks = [load_model(path, device="cpu", tp=TPGroup(r, 2)) for r in range(2)]
    held = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in ranks]
    assert sum(held) == total + replicated
    for h in held:
        assert h == (total - replicated) // 2 + replicated
        assert h <= 0.51 * total
    assert all(m.card.n_kv_heads == whole.card.n_kv_heads // 2 for m in ranks)


@pytest.mark.parametrize("size", range(1, 9))
@pytest.mark.parametrize("model", MODELS[1:])
def test_every_tp_size_the_card_accepts_builds_every_rank(tp_model, model, size):
    """The family's ``tp_splits`` says exactly which sizes its layers can split: a size it
    accepts builds every rank's model; a size it refuses names a config.json field."""
    from illada_batch.model import registry
    from illada_batch.model.family import tp_problem

    family, cfg = registry.parse(tp_model(model) / "config.json")
    problem = tp_problem(family, cfg, size)
    built = []
    for r in range(size):
        try:
            with torch.device("meta"):
                built.append(registry.model_class(family)(cfg, tp=TPGroup(r, size)))
        except ValueError as exc:
            built.append(exc)
    assert (problem is None) == all(isinstance(m, torch.nn.Module) for m in built), (problem, built)
    assert problem is None or problem.startswith("config.json field '"), problem


@given(n=st.integers(1, 5000), size=st.integers(1, 9))
def test_vocabulary_rows_are_split_without_gap_or_overlap(n, size):
    parts = [TPGroup(r, size).vocab_part(n) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert all(0 <= stop - start <= -(-n // size) for start, stop in parts)


def test_a_shard_that_does_not_divide_is_refused_when_loading(family_checkpoint):
    with pytest.raises(CheckpointError, match=r"'n_heads'=4 does not divide by tensor_parallel_size=3"):
        load_model(family_checkpoint("llada"), device="cpu", tp=TPGroup(0, 3))


@pytest.mark.parametrize("family, size, words", [
    ("llada", 3, "engine.tensor_parallel_size: config.json field 'n_heads'=4 does not divide by tensor_parallel_size=3"),
    ("llada", 8, "engine.tensor_parallel_size: config.json field 'n_heads'=4 does not divide by tensor_parallel_size=8"),
    ("dream", 3, "engine.tensor_parallel_size: config.json field 'num_attention_heads'=4 does not divide by "
                 "tensor_parallel_size=3"),
    ("llada-moe", 8, "engine.tensor_parallel_size: config.json field 'num_attention_heads'=4 does not divide by "
                     "tensor_parallel_size=8"),
    ("llada2", 3, "engine.tensor_parallel_size: config.json field 'num_attention_heads'=4 does not divide by "
                  "tensor_parallel_size=3"),
])
def test_validate_refuses_a_tp_size_the_model_cannot_split(family_checkpoint, tmp_path, capsys, family, size, words):
    code, out = validate(spec_file(tmp_path, model={"path": str(family_checkpoint(family))},
                                   engine={"cache": "off", "tensor_parallel_size": size}), capsys=capsys)
    assert code == 1 and words in out, out


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream", "llada2"])
def test_validate_accepts_a_tp_size_that_divides(family_checkpoint, tmp_path, capsys, family):
    code, out = validate(spec_file(tmp_path, model={"path": str(family_checkpoint(family))},
                                   engine={"cache": "off", "tensor_parallel_size": 2}), capsys=capsys)
    assert code == 0, out


def test_llada2_flash_at_tp_8_is_placed_with_its_kv_heads_replicated():
    """The flagship's shape splits over 8 ranks (its 4 KV heads each on 2 ranks): rank 0 of
    the meta-built sharded model holds an eighth of the weights, besides its norms and router."""
    from illada_batch.bench.shape import shapes
    from illada_batch.bench.tp_plan import tp_plan

    family, cfg = shapes()["llada2-flash"]
    plan = tp_plan("llada2-flash", family, cfg, 8)
    assert (plan["query_heads"], plan["kv_heads"]) == (4, 1)
    assert plan["parameters"] / 8 < plan["rank_parameters"] < 1.01 * plan["parameters"] / 8
