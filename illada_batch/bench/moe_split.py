"""How to split an MoE layer's experts over N tensor-parallel ranks, measured on CPU:

- ``intermediate`` (what ``layers/moe.py`` does): every rank holds ``I/N`` columns of every
  expert and computes every (token, expert) pair at ``I/N`` width; perfectly balanced.
- ``expert``: every rank holds ``E/N`` whole experts and computes only the pairs routed to
  them, at full width; its step waits for the busiest rank.

Both hold the same bytes a rank (``E * 3 * d * I / N``, when N divides E and I) and send the
same bytes (every rank has every token; one all-reduce of [tokens, d] after the block), so the
difference is compute: the slowest rank's expert time, which this times on one thread per
rank's share, with the routing a model actually produces (each MoE layer's top-k ids over
random prompts through the model) at the tiny shape and at a wider one (LLaDA-MoE-7B's expert
width), and the load imbalance (the busiest rank's pairs over the mean).

    python -m illada_batch.train.tiny_families --family llada-moe --out /tmp/tiny-llada-moe
    python -m illada_batch.bench.moe_split --model /tmp/tiny-llada-moe --tp 2 --tokens 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from illada_batch.model.layers.linear import TPGroup
from illada_batch.model.layers.moe import Experts, route

WIDE = dict(d=2048, hidden=1024, E=64, k=8)  # LLaDA-MoE-7B's experts


def routing(model, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Each MoE layer's expert ids [tokens, k] for random prompts through ``model``."""
    ids: list[torch.Tensor] = []

    def grab(module, args, _out):
        flat = args[0].reshape(-1, args[0].shape[-1])
        ids.append(route(module.gate(flat), module.spec, getattr(module, "expert_bias", None))[1])

    hooks = [m.register_forward_hook(grab) for m in model.modules() if hasattr(m, "spec")]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randint(3, model.card.vocab_size, (1, tokens), generator=g))
    for h in hooks:
        h.remove()
    return ids


def _time(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rank_loop(experts: Experts, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Expert parallel, one rank: only the pairs routed to its experts [lo, hi), at full width."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        if lo <= e < hi:
            token, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, token, experts[e](x[token]) * w[token, slot, None])
    return out


def measure(d: int, hidden: int, E: int, ids: torch.Tensor, tp: int) -> dict:
    """One MoE layer's expert time on the slowest rank, both ways, for routing ``ids`` [T, k]."""
    T, k = ids.shape
    x, w = torch.randn(T, d), torch.rand(T, k)
    with torch.no_grad():
        sliced = Experts(E, d, hidden // tp)  # one rank's I/N columns of every expert
        whole = Experts(E, d, hidden)  # a rank's whole experts (it uses only its E/N)
        for p in [*sliced.parameters(), *whole.parameters()]:
            p.normal_(0, d ** -0.5)
        parts = [TPGroup(r, tp).part(E, "num_experts") for r in range(tp)]
        t_inter = _time(lambda: sliced(x, w, ids, path="loop"))
        t_expert = max(_time(lambda lo=lo, hi=hi: _rank_loop(whole, x, w, ids, lo, hi)) for lo, hi in parts)
    pairs = [int(((ids >= lo) & (ids < hi)).sum()) for lo, hi in parts]
    return {"intermediate_ms": t_inter * 1e3, "expert_ms": t_expert * 1e3,
            "expert_imbalance": max(pairs) / (sum(pairs) / tp), "pairs_per_rank": pairs,
            "bytes_per_rank_fp32": E * 3 * d * hidden // tp * 4}


def wide_routing(tokens: int, seed: int = 0) -> torch.Tensor:
    """Top-k ids of a random softmax router (LLaDA-MoE's rule) over random hidden states."""
    from illada_batch.model.layers.moe import RouterSpec

    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(WIDE["E"], WIDE["d"], generator=g) * WIDE["d"] ** -0.5
    h = torch.randn(tokens, WIDE["d"], generator=g)
    return route(h @ gate.T, RouterSpec(num_experts=WIDE["E"], top_k=WIDE["k"]))[1]


def main(model_path: str, tp: int = 2, tokens: int = 512, out_path: str = "moe_split.json") -> int:
    from illada_batch.model.checkpoint import load_model

    torch.set_num_threads(1)
    model = load_model(model_path, device="cpu")
    cfg = model.config
    rows = [{"shape": f"{model.card.family} {model_path}", "layer": i,
             **measure(cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, ids, tp)}
            for i, ids in enumerate(routing(model, tokens))]
    rows.append({"shape": "llada-moe-7b experts", "layer": 0,
                 **measure(WIDE["d"], WIDE["hidden"], WIDE["E"], wide_routing(tokens // 2), tp)})
    print(f"TP {tp}, {tokens} tokens (the wide shape {tokens // 2}), one thread, the slowest rank's expert time")
    print(f"{'shape':<22}{'layer':>6}{'intermediate ms':>17}{'expert ms':>11}{'imbalance':>11}  pairs per rank")
    for r in rows:
        print(f"{r['shape']:<22}{r['layer']:>6}{r['intermediate_ms']:>17.2f}{r['expert_ms']:>11.2f}"
              f"{r['expert_imbalance']:>11.2f}  {r['pairs_per_rank']}")
    with open(out_path, "w") as f:
        json.dump([{**r, "tp": tp, "tokens": tokens} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a LLaDA-MoE checkpoint (e.g. the tiny one, written as above)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default="moe_split.json")
    args = ap.parse_args()
    raise SystemExit(main(args.model, args.tp, args.tokens, args.out))
