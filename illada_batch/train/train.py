"""Train the shipped tiny LLaDA model (``tiny-llada``) on the task suite plus some English.

LLaDA's objective: a document's answer tokens are masked at a ratio t ~ U(0, 1] and the
model is trained with cross-entropy on the masked positions weighted by 1/t. Each worked
example in a few-shot prefix is an answer with its own t, so one document trains many
answers; the final row's answer is padded with EOS to the response length, as at
generation time. Plain text (the King James Bible) is masked everywhere, as in
pre-training. ``--isolated-fraction`` of the steps (half by default) isolate the prefix (it
attends only to itself), which is what the ``prefix`` cache mode computes.

Deterministic given ``--seed``. The shipped weights are two stages: the task suite with
half the steps isolated, then a short stage with every prefix isolated, after which the
prefix cache scores within 2 points of the cache off (model card):

    python -m illada_batch.train.train --out runs/tiny-llada --steps 5000 --threads 2
    python -m illada_batch.train.train --out runs/tiny-llada-2 --init-from runs/tiny-llada \
        --isolated-fraction 1 --steps 1000 --lr 1e-3 --warmup 50 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from illada_batch.model.checkpoint import save_checkpoint
from illada_batch.model.configs.llada import PRESETS
from illada_batch.model.llada import LLaDA, isolated_prefix_mask
from illada_batch.model.tokenizer import Tokenizer
from illada_batch.tasks import suite as tasks
from illada_batch.train import tokenizer as tokbuild

RESPONSE_LENGTHS = (16, 32, 32, 32, 64)


class Documents:
    """Endless deterministic stream of (token ids, answer mask, span ids, prefix end)."""

    def __init__(self, tok: Tokenizer, eos: int, seed: int, text: str, text_fraction: float,
                 task_weights: dict[str, float] | None = None) -> None:
        self.tok, self.eos, self.rng = tok, eos, random.Random(seed)
        self.task_weights = task_weights
        self.text_ids = tok.encode(text) if text_fraction > 0 else []
        self.text_fraction = text_fraction
        self.count = lambda s: len(tok.encode(s))

    def task_doc(self, min_prefix_tokens: int) -> tuple[list[int], list[int], int]:
        task = None
        if self.task_weights:
            names = list(self.task_weights)
            task = self.rng.choices(names, weights=[self.task_weights[n] for n in names])[0]
        segments, _ = tasks.training_sequence(self.rng, min_prefix_tokens, self.count, task=task)
        ids: list[int] = []
        span: list[int] = []  # 0 = context, k > 0 = answer span k
        prefix_end = 0
        for i, (text, is_answer) in enumerate(segments):
            if i == len(segments) - 2:  # the final row's prompt starts here
                prefix_end = len(ids)
            piece = self.tok.encode(text)
            if i == len(segments) - 1:  # final answer: padded with EOS to the response length
                piece = piece + [self.eos] * max(0, self.rng.choice(RESPONSE_LENGTHS) - len(piece))
            ids += piece
            span += [i + 1 if is_answer else 0] * len(piece)
        return ids, span, prefix_end

    def text_doc(self, length: int) -> tuple[list[int], list[int], int]:
        start = self.rng.randrange(0, len(self.text_ids) - length)
        return self.text_ids[start:start + length], [1] * length, 0

    def batch(self, size: int) -> list[tuple[list[int], list[int], int]]:
        if self.text_ids and self.rng.random() < self.text_fraction:
            return [self.text_doc(256) for _ in range(size)]
        target = self.rng.randrange(48, 481)  # prefix length of this batch, in tokens
        return [self.task_doc(target) for _ in range(size)]


def collate(docs, pad: int, isolate: bool, gen: torch.Generator):
    L = max(len(d[0]) for d in docs)
    B = len(docs)
    ids = torch.full((B, L), pad, dtype=torch.long)
    span = torch.zeros((B, L), dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    prefix_end = torch.tensor([d[2] for d in docs])
    for i, (x, s, _) in enumerate(docs):
        ids[i, :len(x)], span[i, :len(s)], valid[i, :len(x)] = torch.tensor(x), torch.tensor(s), True
    # one t per answer span: t ~ U(0, 1], drawn per (row, span id)
    t_table = torch.rand((B, int(span.max()) + 1), generator=gen).clamp(min=1e-3)
    t = t_table.gather(1, span)  # [B, L]
    masked = (span > 0) & (torch.rand((B, L), generator=gen) < t)
    attn = isolated_prefix_mask(valid, prefix_end) if isolate else valid  # [B, L, L] or [B, L]
    return ids, attn, masked, t, (span > 0).sum()


def train_step(model: LLaDA, batch, mask_id: int) -> torch.Tensor:
    ids, attn, masked, t, n_answer = batch
    noisy = torch.where(masked, mask_id, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.run(noisy, attention_mask=attn, return_logits=False).hidden  # [B, L, d]
    return diffusion_loss(model, hidden, ids, masked, t, n_answer)


def diffusion_loss(model, hidden: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   n_answer: torch.Tensor) -> torch.Tensor:
    """The masked-diffusion loss: cross-entropy at the masked positions of ``hidden`` [B, L, d]
    weighted 1/t, summed over the batch's answer tokens (``n_answer``)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(hidden[masked]).float()  # [N, V]: only where something is masked
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    return (ce / t[masked]).sum() / n_answer.clamp(min=1)


def evaluate_suite(model, prefixes, rows, **sampling) -> dict[str, float]:
    """Exact-match accuracy with the cache off, steps = gen_length = 32 (no training RNG used);
    ``sampling``: other ``SamplingParams`` fields (default early stop), e.g. a ``threshold``."""
    from illada_batch.decoding.params import SamplingParams
    from illada_batch.engine.diffusion import Engine
    from illada_batch.tasks.evaluate import evaluate

    model.eval()
    params = SamplingParams(steps=32, gen_length=32, block_length=32, **({"early_stop": True} | sampling))
    with torch.no_grad():
        acc = evaluate(Engine(model, cache="off", max_batch_size=25), prefixes, rows, params)["accuracy"]
    model.train()
    return acc


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tiny-llada")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--text-fraction", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-rows", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--init-from", default=None, help="continue from this checkpoint (a second stage)")
    ap.add_argument("--task-weights", default=None, help="e.g. substitute=3,reverse=2 (others 1)")
    ap.add_argument("--isolated-fraction", type=float, default=0.5,
                    help="share of steps whose prefix attends only to itself (what the prefix cache computes)")
    return ap.parse_args(argv)


def new_model(args: argparse.Namespace, out: Path) -> tuple[LLaDA, Tokenizer]:
    """The model to train and its tokenizer (written to ``out``): a fresh one, or a first
    stage's (``--init-from``, whose tokenizer it keeps)."""
    out.mkdir(parents=True, exist_ok=True)
    if args.init_from:  # a second stage keeps the first stage's tokenizer
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((Path(args.init_from) / name).read_bytes())
    else:
        tokbuild.build(out, vocab_size=args.vocab_size, seed=args.seed)
    tok = Tokenizer(out)
    special = {name: tok.token_id(text) for name, text in
               (("mask", "<|mdm_mask|>"), ("eos", "<|endoftext|>"))}
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, embedding_size=tok.vocab_size,
                  mask_token_id=special["mask"], eos_token_id=special["eos"], pad_token_id=special["eos"])
    model = LLaDA(cfg)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    if args.init_from:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(args.init_from) / "model.safetensors")))
    return model, tok


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    model, tok = new_model(args, out)
    cfg = model.config
    model.tokenizer = tok
    model.train()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {cfg.vocab_size}", flush=True)

    weights = None
    if args.task_weights:
        weights = {t: 1.0 for t in tasks.TASKS}
        weights.update({k: float(v) for k, v in (kv.split("=") for kv in args.task_weights.split(","))})
    docs = Documents(tok, cfg.eos_token_id, args.seed, tokbuild.corpus_text() if args.text_fraction else "",
                     args.text_fraction, weights)
    gen = torch.Generator().manual_seed(args.seed)
    eval_prefixes, eval_rows = tasks.make_suite(10_000 + args.seed, max(1, args.eval_rows // len(tasks.TASKS)), 2, 400,
                                                count_tokens=docs.count)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    f = args.isolated_fraction
    isolated = lambda step: math.ceil(step * f) != math.ceil((step - 1) * f)  # noqa: E731 - 0.5: odd steps
    previous = []  # the stages before this one, from --init-from's log (the model card shows them all)
    if args.init_from and (Path(args.init_from) / "train_log.json").exists():
        prev = json.loads((Path(args.init_from) / "train_log.json").read_text())
        previous = prev.get("previous_stages", []) + [{"args": prev["args"], "log": prev["log"]}]
    log, t0, ema = [], time.time(), None
    for step in range(1, args.steps + 1):
        batch = collate(docs.batch(args.batch_size), cfg.pad_token_id, isolate=isolated(step), gen=gen)
        loss = train_step(model, batch, cfg.mask_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            el = time.time() - t0
            print(f"step {step:5d}/{args.steps}  loss {ema:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{el / 60:.1f} min  eta {el / step * (args.steps - step) / 60:.1f} min", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate_suite(model, eval_prefixes, eval_rows)
            print(f"step {step:5d} eval accuracy " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
            log.append({"step": step, "loss": ema, "minutes": (time.time() - t0) / 60, **acc})
            save_checkpoint(model, out)
            (out / "train_log.json").write_text(json.dumps({"previous_stages": previous, "args": vars(args), "log": log},
                                                                 indent=1))
    print(f"done in {(time.time() - t0) / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    main()
