"""Above the engine, any family: ``validate`` prints the family's card (parameters, active
parameters, KV bytes per token) and refuses a self-contradicting config naming its field;
a job on the tiny LLaDA-MoE checkpoint runs end to end on local Ray, every row once, its
``model`` column naming the family."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
from pipeline_support import assert_exactly_once, job_dict, read_output, write_prompts
from test_refusals import spec_file, validate

from illada_batch.job.driver import run_job
from illada_batch.job.spec import spec_from_dict
from illada_batch.model.registry import card_of


def test_validate_prints_the_family_card(family_checkpoint, tmp_path, capsys):
    model = family_checkpoint("llada-moe")
    card = card_of(model)
    code, out = validate(spec_file(tmp_path, model={"path": str(model)}), capsys=capsys)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.strip().startswith("family"))
    assert "llada-moe" in line and f"{card.parameters:,} parameters" in line
    assert f"({card.active_parameters:,} active)" in line and card.active_parameters < card.parameters
    assert f"KV {card.kv_bytes_per_token(2):,} bytes/token" in line


def test_validate_refuses_a_self_contradicting_config(family_checkpoint, tmp_path, capsys):
    model = shutil.copytree(family_checkpoint("llada-moe"), tmp_path / "m")
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "num_experts_per_tok": 12}))
    code, out = validate(spec_file(tmp_path, model={"path": str(model)}), capsys=capsys)
    assert code == 1 and "PROBLEM   model.path:" in out and "'num_experts_per_tok'" in out, out


@pytest.mark.slow
def test_a_job_on_the_tiny_llada_moe_runs_end_to_end(family_checkpoint, tmp_path, ray_cluster):
    fs = fsspec.filesystem("file")
    (tmp_path / "in").mkdir()
    ids = [f"r{i}" for i in range(10)]
    write_prompts(fs, str(tmp_path / "in" / "a.parquet"), ids, [f"prompt number {i}" for i in range(10)])
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), None, n=2,
                                   model={"path": str(family_checkpoint("llada-moe"))}))
    report = run_job(spec, show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0
    table = read_output(fs, str(tmp_path / "out"))
    assert_exactly_once(table, ids, n=2)
    assert set(table.column("model").to_pylist()) == {f"llada-moe:{family_checkpoint('llada-moe')}"}


@pytest.mark.parametrize("family, extra, words", [
    ("llada2", {"engine": {"cache": "prefix"}, "sampling": {"steps": 2, "gen_length": 2, "block_length": 2,
                                                           "cfg_scale": 1.0}},
     "sampling.cfg_scale: llada2's block cache (engine.cache 'prefix') keeps no unconditional K/V"),
    ("llada", {"sampling": {"steps": 2, "gen_length": 2, "block_length": 2, "alg": "entropy"}},
     "sampling.alg: a setting of the dream family's sampler; this model is llada"),
    ("dream", {"sampling": {"steps": 2, "gen_length": 2, "block_length": 2, "editing_threshold": 0.9}},
     "sampling.editing_threshold: a setting of the llada2 family's sampler; this model is dream"),
])
def test_validate_refuses_what_the_models_family_cannot_honour(family_checkpoint, tmp_path, capsys, family, extra,
                                                                  words):
    """The card decides, before any cluster work: a block-causal family's block cache refuses
    classifier-free guidance; a sampler setting of another family is named with both families."""
    code, out = validate(spec_file(tmp_path, model={"path": str(family_checkpoint(family))}, **extra), capsys=capsys)
    assert code == 1 and words in out, out


def test_a_setting_left_unset_takes_the_familys_own_default(family_checkpoint):
    """LLaDA 2.x decodes with its block schedule unless told otherwise; LLaDA 1.x keeps the spread."""
    from illada_batch.decoding.params import SamplingParams, TransferRule
    from illada_batch.model.registry import card_of

    params = SamplingParams(steps=4, gen_length=8, block_length=4)
    assert card_of(family_checkpoint("llada2")).resolve(params).transfer_rule is TransferRule.BLOCK_SCHEDULE
    assert card_of(family_checkpoint("llada")).resolve(params).transfer_rule is None  # the loop's spread
    told = SamplingParams(steps=4, gen_length=8, block_length=4, transfer_rule="spread")
    assert card_of(family_checkpoint("llada2")).resolve(told).transfer_rule is TransferRule.SPREAD


@pytest.mark.slow
@pytest.mark.parametrize("family, engine", [("llada2", {"cache": "prefix"})])  # Dream's: test_dream.py
def test_a_job_on_each_familys_tiny_checkpoint_runs_end_to_end(family_checkpoint, tmp_path, ray_cluster, family,
                                                                engine):
    fs = fsspec.filesystem("file")
    (tmp_path / "in").mkdir()
    ids = [f"r{i}" for i in range(6)]
    write_prompts(fs, str(tmp_path / "in" / "a.parquet"), ids, [f"prompt number {i}" for i in range(6)])
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), None, n=2, engine=engine,
                                   model={"path": str(family_checkpoint(family))}))
    report = run_job(spec, show_progress=False, log=lambda *_: None)
    assert report.exit_code() == 0
    table = read_output(fs, str(tmp_path / "out"))
    assert_exactly_once(table, ids, n=2)
    assert set(table.column("model").to_pylist()) == {f"{family}:{family_checkpoint(family)}"}
