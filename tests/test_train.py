"""The training recipe runs and chains its stages: a stage started from the shipped model keeps
the stages before it in its log, and the model card shows every stage's command."""

from __future__ import annotations

import json

from illada_batch.model.checkpoint import MODELS_DIR, load_model
from illada_batch.train import card, train


def test_a_second_stage_keeps_the_first_in_its_log_and_card(tmp_path):
    out = tmp_path / "stage"
    train.main(["--out", str(out), "--init-from", str(MODELS_DIR / "tiny-llada"), "--steps", "2",
                "--eval-every", "2", "--eval-rows", "5", "--text-fraction", "0", "--isolated-fraction", "1"])
    assert load_model(out).config.n_layers == 4  # a loadable checkpoint
    log = json.loads((out / "train_log.json").read_text())
    shipped = json.loads((MODELS_DIR / "tiny-llada" / "train_log.json").read_text())
    assert log["previous_stages"] == shipped["previous_stages"] + [{"args": shipped["args"], "log": shipped["log"]}]
    assert log["args"]["isolated_fraction"] == 1.0 and log["log"][-1]["step"] == 2

    card.main(["--model", str(out), "--rows-per-task", "1"])
    text = (out / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("python -m illada_batch.train.train")]
    assert len(commands) == len(log["previous_stages"]) + 1
    assert commands[-1].endswith("--isolated-fraction 1") and "--init-from runs/tiny-llada-" in commands[-1]
    assert "## Known limits" in text and json.loads((out / "eval.json").read_text())["rows"] == 5
