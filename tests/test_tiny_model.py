"""The shipped model: it loads by name and by path in LLaDA's format, and it is good at
its task suite (a quality guard on 50 fixed held-out rows, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from illada_batch import load_model
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.model.checkpoint import MODELS_DIR
from illada_batch.tasks.evaluate import evaluate, suite_rows

SHIPPED = MODELS_DIR / "tiny-llada"


def test_loads_by_name_and_by_path_with_its_special_tokens():
    by_name = load_model("tiny-llada", device="cpu")
    by_path = load_model(str(SHIPPED), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(by_name(ids), by_path(ids))
    cfg, tok = by_name.config, by_name.tokenizer
    assert tok.token_id("<|mdm_mask|>") == cfg.mask_token_id
    assert tok.token_id("<|endoftext|>") == cfg.eos_token_id
    assert tok.eot_id is not None and tok.bos_id is not None
    raw = json.loads((SHIPPED / "config.json").read_text())
    assert {"d_model", "n_layers", "n_heads", "mlp_hidden_size", "mask_token_id"} <= set(raw)
    assert (SHIPPED / "model.safetensors").stat().st_size < 20 * 2**20
    assert "<|start_header_id|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_accuracy_on_fixed_held_out_rows():
    torch.set_num_threads(1)
    engine = Engine.from_pretrained("tiny-llada", cache="off", device="cpu")
    prefixes, rows = suite_rows(engine.tokenizer, seed=10_000, rows_per_task=10, prefixes_per_task=2,
                                min_prefix_tokens=400)
    assert len(rows) == 50
    params = SamplingParams(steps=32, gen_length=32, block_length=32, early_stop=True)
    acc = evaluate(engine, prefixes, rows, params)["accuracy"]
    # A quality guard, not the target: the shipped model reaches 78% on the 500-row held-out
    # set (model card: 94-100% on four tasks, 0% on substitute, which it has not learned), short
    # of issue 3's 80% guard and 90% target. A broken loader, tokenizer or decoder scores near 0.
    assert acc["overall"] >= 0.72, acc
    assert min(v for k, v in acc.items() if k not in ("overall", "substitute")) >= 0.8, acc
    # The prefix cache computes what the model was last trained on: within 3 rows of the cache off.
    cached = Engine(engine.model, cache="prefix")
    assert evaluate(cached, prefixes, rows, params)["accuracy"]["overall"] >= acc["overall"] - 0.06


def test_generate_cli_prints_text():
    out = subprocess.run([sys.executable, "-m", "illada_batch.cli", "generate", "--prompt",
                          "Task: Write the same words in reverse order.\n\nInput: lamb king\nOutput: king lamb\n\n"
                          "Input: fire tree gold\nOutput:", "--steps", "16", "--gen-length", "16", "--block-length", "16"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "no generated text"
    assert "tokens/s" in out.stderr


def test_the_model_trained_like_llada_ships_beside_it():
    """tiny-llada-bidir: the same shape and tokenizer, trained with full bidirectional
    attention only (no isolated prefix ever), to measure the cache modes' fidelity."""
    bidir = MODELS_DIR / "tiny-llada-bidir"
    log = json.loads((bidir / "train_log.json").read_text())
    assert log["args"]["isolated_fraction"] == 0 and log["previous_stages"] == []
    assert (bidir / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()
    assert json.loads((bidir / "config.json").read_text()) == json.loads((SHIPPED / "config.json").read_text())
    weights = sum((d / "model.safetensors").stat().st_size for d in (SHIPPED, bidir))
    assert weights < 20 * 2**20
    model = load_model("tiny-llada-bidir", device="cpu")
    ids = torch.tensor([model.tokenizer.encode("Input: lamb king\nOutput:")])
    logits = model(ids)
    assert torch.isfinite(logits).all() and not torch.equal(logits, load_model("tiny-llada", device="cpu")(ids))
