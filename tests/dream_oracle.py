"""Slow, obviously-correct oracles for Dream, written from its definition, not from the
engine: the architecture (Qwen2 layers without a causal mask) read straight from the
checkpoint's tensors in float64, and the reference sampler ``diffusion_generate``
(HKUNLP/Dream ``generation_utils.py``) for one unpadded row at temperature 0.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file


class DreamOracle:
    """``oracle(ids) -> logits [L, V]`` float64: hidden state i gives logits i (unshifted)."""

    def __init__(self, directory) -> None:
        import json
        from pathlib import Path

        self.cfg = json.loads((Path(directory) / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(Path(directory) / "model.safetensors")).items()}

    def rmsnorm(self, x, name):
        return self.w[name] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])

    def rope(self, x, L, hd):  # x [H, L, hd]; rotate the two halves by position * theta^(-2i/hd)
        out = torch.empty_like(x)
        half = hd // 2
        for pos in range(L):
            for i in range(half):
                angle = pos / self.cfg["rope_theta"] ** (2 * i / hd)
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[:, pos, i], x[:, pos, i + half]
                out[:, pos, i], out[:, pos, i + half] = a * c - b * s, b * c + a * s
        return out

    def __call__(self, ids: list[int]) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd, L = cfg["hidden_size"] // H, len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]  # [L, d]
        for n in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{n}."
            h = self.rmsnorm(x, p + "input_layernorm.weight")

            def proj(name):
                return h @ w[p + f"self_attn.{name}.weight"].T + w[p + f"self_attn.{name}.bias"]

            q = self.rope(proj("q_proj").view(L, H, hd).transpose(0, 1), L, hd)  # [H, L, hd]
            k = self.rope(proj("k_proj").view(L, Hkv, hd).transpose(0, 1), L, hd)  # [Hkv, L, hd]
            v = proj("v_proj").view(L, Hkv, hd).transpose(0, 1)
            heads = []
            for head in range(H):  # every query sees every key: no causal mask
                kv = head // (H // Hkv)
                att = torch.softmax(q[head] @ k[kv].T / math.sqrt(hd), dim=-1)  # [L, L]
                heads.append(att @ v[kv])
            x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rmsnorm(x, p + "post_attention_layernorm.weight")
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        return self.rmsnorm(x, "model.norm.weight") @ w["lm_head.weight"].T


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """Dream predicts position i from hidden state i - 1 (position 0 from itself)."""
    return torch.cat([logits[:1], logits[:-1]])


def oracle_diffusion_generate(logits_of, prompt, gen_length, steps, alg, mask_id, generator=None,
                              eps=1e-3):
    """Dream's ``diffusion_generate`` at temperature 0 for ONE unpadded row: ``logits_of(ids)
    -> [L, V]`` unshifted. Returns (response, tokens filled at each step)."""
    x = list(prompt) + [mask_id] * gen_length
    timesteps = torch.linspace(1, eps, steps + 1)  # float32, as the reference
    filled = []
    for i in range(steps):
        masked = [j for j, t in enumerate(x) if t == mask_id]
        logits = shifted(logits_of(x)).float()
        probs = torch.softmax(logits, dim=-1)  # [L, V]
        t, s = timesteps[i], timesteps[i + 1]
        pred = {j: int(probs[j].argmax()) for j in masked}
        assert mask_id not in pred.values(), "test setup: the model must never predict the mask token"
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            draws = torch.rand(len(masked), generator=generator)
            chosen = [j for j, u in zip(masked, draws) if u < p_transfer]
        else:
            def score(j):
                p = probs[j]
                if alg == "maskgit_plus":
                    return float(p.max())
                if alg == "topk_margin":
                    top = p.sort(descending=True).values
                    return float(top[0] - top[1])
                return float((p * torch.log(p + 1e-10)).sum())  # entropy

            n = int(torch.tensor(float(len(masked))) * (1 - s / t)) if i < steps - 1 else len(masked)
            chosen = sorted(masked, key=lambda j: -score(j))[:n]  # ties keep position order
        for j in chosen:
            x[j] = pred[j]
        filled.append(len(chosen))
    return x[len(prompt):], filled
