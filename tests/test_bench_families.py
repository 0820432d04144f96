"""``eval`` and ``bench`` take a checkpoint of any family; the real-shape presets read as
their families' published sizes; a random checkpoint of any family's config loads."""

from __future__ import annotations

import json

import pytest

from illada_batch.cli import main
from illada_batch.model.registry import FAMILIES

SMALL = ["--steps", "8", "--gen-length", "8", "--block-length", "8"]


@pytest.mark.parametrize("family", ["dream", "llada-moe", "llada2"])
def test_eval_runs_on_a_tiny_checkpoint_of_any_family(family, family_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("ILLADA_THREADS", "1")
    code = main(["eval", "--model", str(family_checkpoint(family)), "--rows-per-task", "1", "--prefixes-per-task", "1",
                 "--min-prefix-tokens", "8", *SMALL])
    out = capsys.readouterr().out
    assert code == 0 and "exact match on 5 rows" in out and "overall" in out, out


def test_bench_families_runs_every_family_in_the_modes_its_engine_accepts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ILLADA_THREADS", "1")
    out_path = tmp_path / "bench.json"
    code = main(["bench", "--only", "families", "--rows", "2", "--cache", "off,prefix", "--out", str(out_path)])
    assert code == 0
    report = json.loads(out_path.read_text())["families"]
    assert set(report) == {f.name for f in FAMILIES}
    for name, f in report.items():
        ran = {(r["cache"], r["batch"]) for r in f["runs"]}
        assert ran == {(c, b) for c in ("off", "prefix") for b in (1, 16)}, (name, ran)  # llada2: its exact cache
        assert not f["refused"], name
        for r in f["runs"]:
            assert r["rows"] == 2 and r["tokens_per_s"] > 0 and r["peak_over_weights"] >= 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in report)


# Published sizes (model cards): LLaDA2.0-mini 16B with 1.4B active; LLaDA-MoE-7B-A1B 7B with
# about 1B active without embeddings and head (1.7B with them, untied); Dream-7B 7.6B
# (Qwen2.5-7B's); LLaDA-8B 8B.
PUBLISHED = {"llada2-mini": ((15.5e9, 16.8e9), (1.2e9, 1.6e9)), "llada-moe": ((6.8e9, 7.6e9), (1.0e9, 1.8e9)),
             "dream-7b": ((7.4e9, 7.8e9), (7.4e9, 7.8e9)), "llada-8b": ((7.8e9, 8.2e9), (7.8e9, 8.2e9))}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_a_real_shape_preset_has_its_published_size(shape):
    from illada_batch.bench.shape import shapes

    family, cfg = shapes()[shape]
    card = family.card(cfg)
    (lo, hi), (alo, ahi) = PUBLISHED[shape]
    assert lo < card.parameters < hi and alo < card.active_parameters < ahi, (card.parameters, card.active_parameters)


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_a_random_sharded_checkpoint_of_a_family_loads_streamed(family, tmp_path):
    from illada_batch.bench.wide import write_random_checkpoint
    from illada_batch.model.checkpoint import load_model
    from illada_batch.model.registry import family_named
    from illada_batch.train.tiny_families import TINY

    total = write_random_checkpoint(family_named(family), TINY[family], tmp_path, shard_bytes=2**16)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded, with an index
    model = load_model(tmp_path, device="cpu")
    assert model.card.family == family
    assert total == sum(p.numel() for p in model.parameters()) * 2  # bf16 on disk


def test_bench_on_a_block_causal_checkpoint_runs_its_exact_cache(family_checkpoint, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("ILLADA_THREADS", "1")
    out_path = tmp_path / "bench.json"
    code = main(["bench", "--model", str(family_checkpoint("llada2")), "--only", "modes", "--rows", "1",
                 "--cache", "off,prefix", "--out", str(out_path)])
    report = json.loads(out_path.read_text())
    assert code == 0 and report["family"] == "llada2" and not report["refused_caches"]
    assert {r["cache"] for r in report["modes"]} == {"off", "prefix"}
