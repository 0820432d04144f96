"""Measure the shipped model on the held-out task suite and write its model card.

    python -m illada_batch.train.card --model runs/tiny-llada [--rows-per-task 100]

Accuracy per task at steps = gen_length, gen_length / 2 and gen_length / 4 (cache off,
temperature 0, prefixes of 400+ tokens), plus the prefix cache's accuracy and agreement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.tasks.evaluate import evaluate, suite_rows
from illada_batch.tasks.suite import TASKS

GEN = 32
NOTES = Path(__file__).with_name("card_notes.md")  # what the figures do not say, appended to the card


def measure(model_dir: str, rows_per_task: int) -> dict:
    torch.set_num_threads(2)
    off = Engine.from_pretrained(model_dir, cache="off", max_batch_size=16)
    prefixes, rows = suite_rows(off.tokenizer, seed=10_000, rows_per_task=rows_per_task, prefixes_per_task=4,
                                min_prefix_tokens=400)
    lengths = [len(off.tokenizer.encode(p)) for p in prefixes.values()]
    out = {"rows": len(rows), "prefix_tokens": [min(lengths), max(lengths)], "by_steps": {}}
    base = None
    for steps in (GEN, GEN // 2, GEN // 4):
        params = SamplingParams(steps=steps, gen_length=GEN, block_length=GEN, early_stop=True)
        res = evaluate(off, prefixes, rows, params)
        out["by_steps"][steps] = res["accuracy"]
        base = base or res
        print(f"steps {steps:3d}: " + "  ".join(f"{k} {v:.1%}" for k, v in res["accuracy"].items()), flush=True)
    pre = Engine(off.model, cache="prefix", max_batch_size=16)
    res = evaluate(pre, prefixes, rows, SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=True))
    agree = sum(a.token_ids == b.token_ids for a, b in zip(base["results"], res["results"])) / len(rows)
    out["prefix_cache"] = {"accuracy": res["accuracy"], "agreement_with_off": agree}
    print(f"prefix cache, steps {GEN}: overall {res['accuracy']['overall']:.1%}, identical to off {agree:.1%}")
    return out


def _commands(stages: list[dict]) -> list[str]:
    """The command of each training stage; stage k > 1 starts from stage k - 1's output."""
    lines, prev = [], None
    for k, st in enumerate(stages, 1):
        a = st["args"]
        out = "runs/tiny-llada" + (f"-{k}" if k > 1 else "")
        cmd = f"python -m illada_batch.train.train --out {out} --steps {a['steps']} --threads {a['threads']} --seed {a['seed']}"
        if prev:
            cmd += f" --init-from {prev} --lr {a['lr']:g} --warmup {a['warmup']}"
        for flag, key, default in (("--isolated-fraction", "isolated_fraction", 0.5), ("--task-weights", "task_weights", None)):
            if a.get(key, default) != default:
                cmd += f" {flag} {a[key]:g}" if isinstance(a[key], float) else f" {flag} {a[key]}"
        lines.append(cmd)
        prev = out
    lines.append(f"python -m illada_batch.train.card --model {prev}")
    return lines


def _stage_text(a: dict) -> str:
    iso = a.get("isolated_fraction", 0.5)
    return f"{a['steps']} steps at lr {a['lr']:g} with " + ("every prefix isolated" if iso == 1 else f"{iso:.0%} of the prefixes isolated")


def write_card(model_dir: Path, m: dict) -> None:
    log = json.loads((model_dir / "train_log.json").read_text()) if (model_dir / "train_log.json").exists() else {}
    stages = log.get("previous_stages", []) + ([{"args": log["args"], "log": log["log"]}] if log.get("args") else [])
    minutes = sum(st["log"][-1]["minutes"] for st in stages if st["log"])
    cfg = json.loads((model_dir / "config.json").read_text())
    from illada_batch.model.checkpoint import load_model

    model = load_model(model_dir, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    steps = sorted(m["by_steps"], key=int, reverse=True)
    head = "| task | " + " | ".join(f"steps {s}" for s in steps) + " | prefix cache (steps 32) |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for task in [*TASKS, "overall"]:
        cells = [f"{m['by_steps'][s][task]:.1%}" for s in steps]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {m['prefix_cache']['accuracy'][task]:.1%} |")
    text = f"""# tiny-llada

A {params / 1e6:.2f}M-parameter masked-diffusion language model in LLaDA-8B's exact format
(`config.json` field names, tensor names, a byte-level BPE `tokenizer.json` of
{cfg['vocab_size']} tokens with LLaDA's special tokens, a Llama-3-style chat template),
trained here on CPU for illada-batch's demo, tests and benchmarks. Shape: d_model
{cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, MLP {cfg['mlp_hidden_size']}, RoPE theta {cfg['rope_theta']}.

It was trained with LLaDA's objective on the checkable few-shot task suite
(`illada_batch/tasks/suite.py`: reverse, sort, rotate, double, substitute) and 10% King James
Bible text. It reads the task from its prefix; beyond the tasks it writes scripture-like
fragments, not coherent prose.

## Accuracy

Exact match on {m['rows']} held-out rows (seed 10000, {m['rows'] // len(TASKS)} per task, prefixes of
{m['prefix_tokens'][0]}-{m['prefix_tokens'][1]} tokens), gen_length {GEN}, one block, temperature 0,
early stop; cache off unless stated. The prefix cache agrees token for token with cache
off on {m['prefix_cache']['agreement_with_off']:.1%} of rows.

{chr(10).join(lines)}

Measure again: `python -m illada_batch.train.card --model illada_batch/models/tiny-llada --no-write`
(or `illada-batch eval --steps 32`).

## Recipe

```bash
{chr(10).join(_commands(stages))}
```

Deterministic given the seed (the tokenizer is rebuilt from Debian's `bible-kjv-text`
and the task suite; the data stream and the masking come from seeded generators).
{" then ".join(_stage_text(st['args']) for st in stages)}; batch 16, AdamW with warmup and
cosine decay, bf16 autocast on CPU{f'; {minutes:.0f} minutes in all on this kind of machine (2 cores, shared with other work)' if minutes else ''}.
The training log of each stage (loss and eval accuracy, cache off, 50 rows) is in `train_log.json`.
"""
    if NOTES.exists():
        text += "\n" + NOTES.read_text()
    (model_dir / "README.md").write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows-per-task", type=int, default=100)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    m = measure(a.model, a.rows_per_task)
    (Path(a.model) / "eval.json").write_text(json.dumps(m, indent=1)) if not a.no_write else None
    if not a.no_write:
        write_card(Path(a.model), m)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
