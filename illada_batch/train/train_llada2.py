"""Train the shipped tiny LLaDA 2.x model (``tiny-llada2``) on the task suite with the
block-diffusion objective, starting from ``tiny-llada``'s weights.

LLaDA 2.0 was made by converting an autoregressive model and continuing its training with
block diffusion; here the starting point is ``tiny-llada`` (the bidirectional LLaDA 1.x
model trained on the same task suite), written into LLaDA 2.x's layout
(``init_from_llada``): its q/k/v fused into ``query_key_value``, its MLPs as dense layers,
and its last layer's MLP upcycled into a mixture of experts (every expert a copy of it, so
the first forward equals the dense one). No q/k norm (``use_qk_norm: false``) and full
rotary, as the weights were trained.

The objective (SDAR / LLaDA 2.0): a document ``[few-shot prefix | prompt | answer]`` from
``train.Documents`` is cut into blocks of ``--block-length`` tokens aligned at position 0.
Each block draws its own ratio t ~ U(0, 1] and its answer tokens are masked at that ratio.
The model runs on ``[noisy document | clean document]`` (2L tokens, the same positions twice)
under one mask: a noisy block attends to itself and to the clean blocks before it; a clean
block to itself and the clean blocks before it (block-causal). Loss: cross-entropy on the
masked positions weighted 1/t (``train.diffusion_loss``), so every block of every document
is trained in one forward, each with its clean past, as at generation time::

    python -m illada_batch.train.train_llada2 --out runs/tiny-llada2 --steps 600 --eval-every 100 --max-minutes 32
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from illada_batch.model.checkpoint import load_model
from illada_batch.model.tokenizer import Tokenizer
from illada_batch.tasks import suite as tasks
from illada_batch.train.tiny_llada2 import config as llada2_config
from illada_batch.train.train import Documents, diffusion_loss, evaluate_suite

TINY_LLADA = Path(__file__).resolve().parent.parent / "models" / "tiny-llada"


def init_from_llada(src: Path, out: Path, num_experts: int = 4, seed: int = 0) -> Path:
    """Write ``src`` (a LLaDA 1.x checkpoint) as a LLaDA 2.x checkpoint in ``out``: the same
    function (dense layers, the last MLP upcycled into ``num_experts`` identical experts, top-2
    of them renormalised to weights summing to 1, routed by a small random gate)."""
    c = json.loads((src / "config.json").read_text())
    n, d, hd = c["n_layers"], c["d_model"], c["d_model"] // c["n_heads"]
    cfg = llada2_config(hidden_size=d, intermediate_size=c["mlp_hidden_size"], moe_intermediate_size=c["mlp_hidden_size"],
                        num_hidden_layers=n, num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
                        head_dim=hd, vocab_size=c["vocab_size"], num_experts=num_experts, num_experts_per_tok=2,
                        n_group=1, topk_group=1, num_shared_experts=0, first_k_dense_replace=n - 1,
                        routed_scaling_factor=1.0, partial_rotary_factor=1.0, rope_theta=c["rope_theta"],
                        rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_sequence_length"],
                        use_qk_norm=False, mask_token_id=c["mask_token_id"], eos_token_id=c["eos_token_id"],
                        pad_token_id=c["pad_token_id"])
    w = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    t = {"model.word_embeddings.weight": w["model.transformer.wte.weight"],
         "model.norm.weight": w["model.transformer.ln_f.weight"], "lm_head.weight": w["model.transformer.ff_out.weight"]}
    for i in range(n):
        b, p = f"model.transformer.blocks.{i}", f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = w[f"{b}.attn_norm.weight"]
        t[f"{p}.post_attention_layernorm.weight"] = w[f"{b}.ff_norm.weight"]
        t[f"{p}.attention.query_key_value.weight"] = torch.cat([w[f"{b}.{x}_proj.weight"] for x in "qkv"])
        t[f"{p}.attention.dense.weight"] = w[f"{b}.attn_out.weight"]
        mlp = {"gate_proj": w[f"{b}.ff_proj.weight"], "up_proj": w[f"{b}.up_proj.weight"],
               "down_proj": w[f"{b}.ff_out.weight"]}
        if i < cfg["first_k_dense_replace"]:
            t |= {f"{p}.mlp.{k}.weight": v for k, v in mlp.items()}
            continue
        t[f"{p}.mlp.gate.weight"] = torch.randn(num_experts, d, generator=g) * 0.02
        t[f"{p}.mlp.gate.expert_bias"] = torch.zeros(num_experts)
        t |= {f"{p}.mlp.experts.{e}.{k}.weight": v.clone() for e in range(num_experts) for k, v in mlp.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


def block_diffusion_mask(valid: torch.Tensor, block_length: int) -> torch.Tensor:
    """valid [B, L] -> [B, 2L, 2L] (True = may attend) over ``[noisy | clean]``: noisy block k
    sees noisy block k and clean blocks < k; clean block k sees clean blocks <= k."""
    L = valid.shape[1]
    blk = torch.arange(L) // block_length
    same, before = blk[:, None] == blk[None, :], blk[:, None] > blk[None, :]
    none = torch.zeros(L, L, dtype=torch.bool)
    m = torch.cat([torch.cat([same, before], 1), torch.cat([none, same | before], 1)], 0)  # [2L, 2L]
    keys = torch.cat([valid, valid], 1)  # [B, 2L]
    return m[None] & keys[:, None, :]


def collate(docs, pad: int, block_length: int, gen: torch.Generator):
    """docs from ``Documents`` -> (input ids [B, 2L], positions [B, 2L], mask [B, 2L, 2L],
    masked [B, L], t [B, L], targets [B, L], answer tokens): one t per (row, block)."""
    L = max(len(d[0]) for d in docs)
    B = len(docs)
    ids = torch.full((B, L), pad, dtype=torch.long)
    answer = torch.zeros((B, L), dtype=torch.bool)
    valid = torch.zeros((B, L), dtype=torch.bool)
    for i, (x, s, _) in enumerate(docs):
        ids[i, :len(x)], answer[i, :len(s)], valid[i, :len(x)] = torch.tensor(x), torch.tensor(s) > 0, True
    blocks = torch.arange(L) // block_length
    t = torch.rand((B, int(blocks[-1]) + 1), generator=gen).clamp(min=1e-3)[:, blocks]  # [B, L]
    masked = answer & (torch.rand((B, L), generator=gen) < t)
    positions = torch.arange(L).repeat(2).expand(B, 2 * L)
    return ids, positions, block_diffusion_mask(valid, block_length), masked, t, answer.sum()


def train_step(model, batch, mask_id: int) -> torch.Tensor:
    ids, positions, attn, masked, t, n_answer = batch
    x = torch.cat([torch.where(masked, mask_id, ids), ids], 1)  # [B, 2L]: noisy, then clean
    L = ids.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.run(x, attention_mask=attn, positions=positions, return_logits=False).hidden[:, :L]
    return diffusion_loss(model, hidden, ids, masked, t, n_answer)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tiny-llada2")
    ap.add_argument("--init-from", default=str(TINY_LLADA), help="the LLaDA 1.x checkpoint to start from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-rows", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=35.0, help="stop after this much wall time")
    ap.add_argument("--target", type=float, default=0.76, help="stop once eval overall accuracy reaches this")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    init_from_llada(Path(args.init_from), out, seed=args.seed)
    model = load_model(out, device="cpu")
    for name, p in model.named_parameters():  # loaded frozen; the router's expert_bias stays fixed
        p.requires_grad_(not name.endswith("expert_bias"))
    cfg = model.config
    model.train()
    tok = Tokenizer(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    docs = Documents(tok, cfg.eos_token_id, args.seed, "", 0.0)
    gen = torch.Generator().manual_seed(args.seed)
    eval_prefixes, eval_rows = tasks.make_suite(10_000 + args.seed, max(1, args.eval_rows // len(tasks.TASKS)), 2, 400,
                                                count_tokens=docs.count)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    log, t0, ema = [], time.time(), None

    def checkpoint(step: int) -> dict[str, float]:
        acc = evaluate_suite(model, eval_prefixes, eval_rows, threshold=args.threshold)
        print(f"step {step:5d} eval accuracy " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
        log.append({"step": step, "loss": ema, "minutes": (time.time() - t0) / 60, **acc})
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
        return acc

    checkpoint(0)
    for step in range(1, args.steps + 1):
        loss = train_step(model, collate(docs.batch(args.batch_size), cfg.pad_token_id, args.block_length, gen),
                          cfg.mask_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        minutes = (time.time() - t0) / 60
        if step % 25 == 0:
            print(f"step {step:5d}/{args.steps}  loss {ema:.3f}  lr {sched.get_last_lr()[0]:.2e}  {minutes:.1f} min",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps or minutes > args.max_minutes:
            if checkpoint(step)["overall"] >= args.target or minutes > args.max_minutes:
                break
    print(f"done in {(time.time() - t0) / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    main()
