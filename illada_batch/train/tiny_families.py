"""Tiny random checkpoints, one per family, in the family's real Hugging Face layout:
config.json under its own field names, safetensors under its own tensor names, and the
shipped tiny tokenizer (``<|mdm_mask|>`` 2, ``<|endoftext|>`` 1, 2048 ids). For tests and
CPU benchmarks: random weights, so the text is noise; the numbers are what is checked.

    python -m illada_batch.train.tiny_families --family llada-moe --out /tmp/tiny-llada-moe

A family adds its tiny config to ``TINY`` (2-4 layers; MoE with 8 experts top-2; GQA
where the family has it). Weights: the model's default init, norm weights drawn in
[0.5, 1.5] and expert biases N(0, 0.05) so that every weight matters to the logits, the
mask token's head row zeroed (it is never the argmax).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

from illada_batch.model import registry
from illada_batch.model.checkpoint import MODELS_DIR, save_checkpoint
from illada_batch.model.configs.dream import DreamConfig
from illada_batch.model.configs.llada import LLaDAConfig
from illada_batch.model.configs.llada_moe import LLaDAMoEConfig
from illada_batch.train.tiny_llada2 import write_tiny_llada2

TOKENIZER_FROM = MODELS_DIR / "tiny-llada"
_IDS = dict(mask_token_id=2, eos_token_id=1, pad_token_id=1)

TINY: dict[str, Any] = {
    "llada": LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=2048,
                         embedding_size=2048, rope_theta=10000.0, max_sequence_length=512, **_IDS),
    # 3 layers: the first dense (moe_layer_freq 0), two MoE with a shared expert; q/k norm,
    # expert bias and partial rotary on, so that each of them moves the logits.
    "llada-moe": LLaDAMoEConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, dense_intermediate_size=128, expert_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                moe_layer_freq=(0, 1, 1), moe_router_enable_expert_bias=True, qk_layernorm=True,
                                partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=512, **_IDS),
    # Dream-7B's shape in small: GQA (4 query heads on 2 KV heads), q/k/v biases.
    "dream": DreamConfig(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         max_position_embeddings=512, **_IDS),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random model of ``family`` (float32, CPU)."""
    if family not in TINY:
        raise ValueError(f"no tiny config for family {family!r} (have {', '.join(TINY)})")
    cfg = TINY[family]
    torch.manual_seed(seed)
    model = registry.model_class(registry.family_named(family))(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("expert_bias"):
                p.normal_(0.0, 0.05)
        model.head_weight[model.card.mask_token_id].zero_()
    return model.eval()


# Families whose tiny checkpoint is written from the HF layout directly (their config class
# reads config.json but does not write it).
WRITERS = {"llada2": write_tiny_llada2}


def write_tiny(family: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of ``family`` to ``out`` (config.json, model.safetensors, tokenizer)."""
    if family in WRITERS:
        return WRITERS[family](out, seed)
    out = save_checkpoint(tiny_model(family, seed), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted({*TINY, *WRITERS}))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_tiny(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
