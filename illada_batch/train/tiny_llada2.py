"""Write a tiny random LLaDA 2.x checkpoint in the real Hugging Face layout (``llada2_moe``):
``config.json`` with LLaDA2.0's own field names, ``model.safetensors`` with its tensor names
(fused ``attention.query_key_value``, ``query_layernorm``/``key_layernorm``, ``mlp.gate`` with
its ``expert_bias``, ``mlp.experts.N`` and ``mlp.shared_experts``, ``lm_head``), and
``tiny-llada``'s 2048-token tokenizer (its ids: mask 2, EOS 1, written into the config).

The shape exercises every part of the architecture: 3 layers, the first dense
(``first_k_dense_replace``), MoE with 8 experts top-2 in two groups of which one is kept
(``topk_group``), one shared expert, GQA (4 query heads over 2 KV heads), q/k RMSNorm,
partial rotary (half of each head). Random, not trained: it tests parity and the pipeline,
it does not write sensible text. Weights are scaled so the next token depends on the context
and confidences spread over (0, 1), which the threshold and editing rules need::

    python -m illada_batch.train.tiny_llada2 --out /tmp/tiny-llada2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FROM = Path(__file__).resolve().parent.parent / "models" / "tiny-llada"

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=2048, num_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-6,
            max_position_embeddings=1024, use_qk_norm=True, use_qkv_bias=False, use_bias=False)


def config(**overrides) -> dict:
    """config.json as LLaDA2.0-mini writes it (its field names), at the tiny shape."""
    return {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_act": "silu",
            "norm_head": False, "tie_word_embeddings": False, "rope_scaling": None, "torch_dtype": "float32",
            "mask_token_id": 2, "eos_token_id": 1, "pad_token_id": 1, **TINY, **overrides}


def weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under LLaDA2's names: linear weights with std 1/sqrt(fan_in), norms and
    the expert bias perturbed so that each of them changes the logits."""
    g = torch.Generator().manual_seed(seed)
    H, V, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def linear(out_f, in_f, scale=1.0):
        return normal(out_f, in_f, std=scale / math.sqrt(in_f))

    def norm(n):
        return 1.0 + normal(n, std=0.2)

    def mlp(prefix, inter):
        return {f"{prefix}.gate_proj.weight": linear(inter, H), f"{prefix}.up_proj.weight": linear(inter, H),
                f"{prefix}.down_proj.weight": linear(H, inter)}

    t = {"model.word_embeddings.weight": normal(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(H)
        t[f"{p}.post_attention_layernorm.weight"] = norm(H)
        t[f"{p}.attention.query_key_value.weight"] = linear((nq + 2 * nkv) * hd, H, scale=2.0)
        if cfg["use_qkv_bias"]:
            t[f"{p}.attention.query_key_value.bias"] = normal((nq + 2 * nkv) * hd, std=0.1)
        if cfg["use_qk_norm"]:
            t[f"{p}.attention.query_layernorm.weight"] = norm(hd)
            t[f"{p}.attention.key_layernorm.weight"] = norm(hd)
        t[f"{p}.attention.dense.weight"] = linear(H, nq * hd)
        if cfg["use_bias"]:
            t[f"{p}.attention.dense.bias"] = normal(H, std=0.1)
        if i < cfg["first_k_dense_replace"]:
            t |= mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        t[f"{p}.mlp.gate.weight"] = linear(cfg["num_experts"], H, scale=2.0)
        t[f"{p}.mlp.gate.expert_bias"] = normal(cfg["num_experts"], std=0.1)
        for e in range(cfg["num_experts"]):
            t |= mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        if cfg["num_shared_experts"]:
            t |= mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["num_shared_experts"])
    t["model.norm.weight"] = norm(H)
    t["lm_head.weight"] = linear(V, H, scale=4.0)
    return t


def write_tiny_llada2(out: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the checkpoint directory ``out`` (config, weights, tokenizer) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(**overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in weights(cfg, seed).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_tiny_llada2(args.out, args.seed))


if __name__ == "__main__":
    main()
