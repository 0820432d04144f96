"""Make ``tiny-qwen2``: a small autoregressive checkpoint in Hugging Face's Qwen2 layout, for
the vLLM backend's tests and the side-by-side benchmark. Offline and deterministic (random
weights from a seeded generator, no training): it exercises the pipeline and measures speed,
it does not write sensible text.

Its shape matches ``tiny-llada`` (d_model 128, 4 layers, MLP 384, the same 2048-token
tokenizer, an untied output head: 1.38M parameters), except 2 heads of 64 instead of 4 of 32
(vLLM's CPU attention needs a head dimension of at least 64)::

    python -m illada_batch.train.tiny_ar --out illada_batch/models/tiny-qwen2
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

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024)


def config(tokenizer_config: dict) -> dict:
    ids = {t["content"]: int(i) for i, t in tokenizer_config["added_tokens_decoder"].items()}
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SHAPE,
        "head_dim": SHAPE["hidden_size"] // SHAPE["num_attention_heads"], "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": SHAPE["num_hidden_layers"], "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": ids[tokenizer_config["bos_token"]], "eos_token_id": ids[tokenizer_config["eos_token"]],
        "pad_token_id": ids[tokenizer_config["pad_token"]],
    }


def weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under Qwen2's names. Linear weights have std 1/sqrt(fan_in) (q and k
    twice that, for sharp attention) so the next token depends on the context."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(shape, std):
        return torch.randn(*shape, generator=g) * std

    def linear(out_f, in_f, scale=1.0):
        return normal((out_f, in_f), scale / math.sqrt(in_f))

    t = {"model.embed_tokens.weight": normal((V, H), 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": linear(q_out, H, 2.0), p + "self_attn.q_proj.bias": normal((q_out,), 0.02),
            p + "self_attn.k_proj.weight": linear(kv_out, H, 2.0), p + "self_attn.k_proj.bias": normal((kv_out,), 0.02),
            p + "self_attn.v_proj.weight": linear(kv_out, H), p + "self_attn.v_proj.bias": normal((kv_out,), 0.02),
            p + "self_attn.o_proj.weight": linear(H, q_out),
            p + "mlp.gate_proj.weight": linear(I, H), p + "mlp.up_proj.weight": linear(I, H),
            p + "mlp.down_proj.weight": linear(H, I),
        }
    t["model.norm.weight"] = torch.ones(H)
    t["lm_head.weight"] = linear(V, H, 4.0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}


def build(out: Path, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tok_cfg = json.loads((TOKENIZER_FROM / "tokenizer_config.json").read_text())
    tok_cfg.pop("mask_token", None)  # an autoregressive model has no mask token
    cfg = config(tok_cfg)
    shutil.copyfile(TOKENIZER_FROM / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
         "pad_token_id": cfg["pad_token_id"]}, indent=2) + "\n")
    tensors = weights(cfg, seed)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    n = sum(v.numel() for v in tensors.values())
    (out / "README.md").write_text(
        f"# tiny-qwen2\n\nA {n / 1e6:.2f}M-parameter autoregressive model in Hugging Face's Qwen2 layout, with "
        f"tiny-llada's 2048-token tokenizer and chat template, for illada-batch's vLLM backend (tests and "
        f"`illada-batch bench --backend vllm`). Shape: hidden {SHAPE['hidden_size']}, "
        f"{SHAPE['num_hidden_layers']} layers, {SHAPE['num_attention_heads']} heads of "
        f"{cfg['head_dim']}, MLP {SHAPE['intermediate_size']}, untied head, bf16.\n\n"
        f"Random weights (seed {seed}), not trained: its text is noise. Made offline by\n"
        f"`python -m illada_batch.train.tiny_ar --out illada_batch/models/tiny-qwen2 --seed {seed}`.\n")
    return {"params": n, "config": cfg}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = build(args.out, args.seed)
    print(f"wrote {args.out}: {info['params']:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
