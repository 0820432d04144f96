"""``bench --model-shape <shape> --random-weights --tp N``: the placement of a real shape on N
ranks, before any device is asked for: whether the family's ``tp_splits`` divide (one line
naming the config.json field when not), and what rank 0 would hold, counted on the meta device
from the sharded model itself (no memory): parameters and bf16 bytes, query and KV heads
(KV heads fewer than the ranks are replicated), expert columns, K/V bytes a token.
"""

from __future__ import annotations

import torch

from illada_batch.errors import UserError
from illada_batch.model.family import tp_problem
from illada_batch.model.layers.linear import TPGroup, local_card


def tp_plan(shape: str, family, cfg, size: int) -> dict:
    """Rank 0's share of ``shape`` at TP ``size``; refuses a size its layers cannot split."""
    from illada_batch.model.registry import model_class

    problem = tp_problem(family, cfg, size)
    if problem:
        raise UserError(f"--model-shape {shape} --tp {size}: {problem}")
    with torch.device("meta"):
        model = model_class(family)(cfg, tp=TPGroup(0, size))
    held = sum(p.numel() for p in model.parameters())
    whole = family.card(cfg)
    attn = next(m for m in model.modules() if hasattr(m, "n_kv_heads"))
    return {"shape": shape, "tp": size, "parameters": whole.parameters, "rank_parameters": held,
            "rank_bf16_gb": held * 2 / 1e9, "query_heads": attn.n_heads, "kv_heads": attn.n_kv_heads,
            "kv_bytes_per_token_bf16": local_card(whole, TPGroup(0, size)).kv_bytes_per_token(2),
            "splits": family.tp_splits(cfg)}


def plan_line(plan: dict) -> str:
    return (f"{plan['shape']} at TP {plan['tp']}: rank 0 holds {plan['rank_parameters'] / 1e9:.2f}B of "
            f"{plan['parameters'] / 1e9:.1f}B parameters ({plan['rank_bf16_gb']:.1f} GB bf16), {plan['query_heads']} "
            f"query and {plan['kv_heads']} KV head(s) a layer, {plan['kv_bytes_per_token_bf16']} K/V bytes a token; "
            f"split: {', '.join(f'{k}={v}' for k, v in plan['splits'].items())}")
