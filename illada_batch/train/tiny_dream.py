"""Write a tiny random Dream checkpoint in Dream's real Hugging Face layout.

``config.json`` carries Dream-7B's field names (``model_type: "Dream"``, ``hidden_size``,
``num_key_value_heads``, ``mask_token_id`` ...) and ``model.safetensors`` its tensor names
(``model.layers.N.self_attn.q_proj.weight`` / ``.bias`` ...), so the loader, the registry and
the tests read it exactly as they would read Dream-v0-7B. The tokenizer is tiny-llada's
(shipped), so its special ids are the checkpoint's: mask 2, EOS 1, pad 1.

Weights are random but shaped to be a useful test model: the output depends on the context
(sharp q/k), the mask token is never the argmax (its head row is zero), ties are impossible.

    python -m illada_batch.train.tiny_dream OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from illada_batch.model.checkpoint import MODELS_DIR

TOKENIZER_FROM = MODELS_DIR / "tiny-llada"

# Dream-v0-Instruct-7B's config.json with a tiny shape (2 layers, GQA 4 query heads on 2 KV heads).
TINY_DREAM = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
    "mask_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 160,
    "initializer_range": 0.02,
    "max_position_embeddings": 1024,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 2048,
}


def dream_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Dream's tensor names and shapes for ``cfg`` (a config.json dict)."""
    g = torch.Generator().manual_seed(seed)
    d, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        return torch.rand(d, generator=g) + 0.5  # uniform [0.5, 1.5)

    out = {"model.embed_tokens.weight": normal(V, d, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": norm_weight(),
            p + "self_attn.q_proj.weight": normal(q_out, d, std=2 / math.sqrt(d)),  # sharp attention
            p + "self_attn.q_proj.bias": normal(q_out, std=0.1),
            p + "self_attn.k_proj.weight": normal(kv_out, d, std=2 / math.sqrt(d)),
            p + "self_attn.k_proj.bias": normal(kv_out, std=0.1),
            p + "self_attn.v_proj.weight": normal(kv_out, d, std=1 / math.sqrt(d)),
            p + "self_attn.v_proj.bias": normal(kv_out, std=0.1),
            p + "self_attn.o_proj.weight": normal(d, q_out, std=1 / math.sqrt(q_out)),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "mlp.gate_proj.weight": normal(inter, d, std=1 / math.sqrt(d)),
            p + "mlp.up_proj.weight": normal(inter, d, std=1 / math.sqrt(d)),
            p + "mlp.down_proj.weight": normal(d, inter, std=1 / math.sqrt(inter)),
        })
    out["model.norm.weight"] = norm_weight()
    head = normal(V, d, std=0.5)
    head[cfg["mask_token_id"]] = 0.0  # [MASK] is never the argmax
    out["lm_head.weight"] = head
    return out


def write_tiny_dream(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """config.json, model.safetensors and tiny-llada's tokenizer into ``directory``.
    ``overrides``: config.json fields (a different shape, ids ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_DREAM, **overrides}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(dream_tensors(cfg, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / name, directory / name)
    return directory


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_tiny_dream(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
