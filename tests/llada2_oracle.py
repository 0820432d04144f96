"""Slow, obviously-correct oracles of LLaDA 2.x, written from the architecture's definition
(issue 18, item 3) and the reference decoding of LLaDA 2.0 / 2.1 (inclusionAI's
``LLaDA2MoeModelLM.generate``), for ONE unpadded row, in float64, with plain Python loops
(one token at a time through the router, one query at a time through attention).

- ``Llada2Oracle(directory).logits(ids, block)``: logits [L, V] of the checkpoint in
  ``directory`` (tensors read by name from its safetensors and copied, never memory-mapped),
  with block-causal attention (blocks of ``block`` aligned at position 0) or, ``block=None``,
  every position seeing every position.
- ``oracle_generate_llada2``: the reference sampler at temperature 0, with the mask and EOS
  ids of the config (not the reference's hard-coded 156895 / 156892) and the engine's one rule
  on top: [MASK] is never chosen (the argmax skips it; its probability still counts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


class Llada2Oracle:
    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.cfg = json.loads((directory / "config.json").read_text())
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            self.w = {k: f.get_tensor(k).clone().double() for k in f.keys()}  # copied: no mmap alignment effects

    def rms(self, x, weight):
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    def rope(self, x, pos):
        """x [hd] at position ``pos``: the first rotary_dim dims rotated in two halves, the rest kept."""
        hd = x.shape[-1]
        rd = int(hd * self.cfg["partial_rotary_factor"])
        out = x.clone()
        for i in range(rd // 2):
            freq = 1.0 / self.cfg["rope_theta"] ** (2 * i / rd)
            c, s = math.cos(pos * freq), math.sin(pos * freq)
            a, b = x[i], x[i + rd // 2]
            out[i], out[i + rd // 2] = a * c - b * s, b * c + a * s
        return out

    def mlp(self, prefix, x):
        w = self.w
        gate = x @ w[f"{prefix}.gate_proj.weight"].T
        return (gate * torch.sigmoid(gate) * (x @ w[f"{prefix}.up_proj.weight"].T)) @ w[f"{prefix}.down_proj.weight"].T

    def moe(self, p, x):
        """One token x [H]: sigmoid scores, expert bias for selection only, groups ranked by the
        sum of their top two, the best ``topk_group`` kept, top-k experts among them, weights the
        unbiased scores renormalised times ``routed_scaling_factor``, plus the shared experts."""
        cfg, w = self.cfg, self.w
        E, k, G = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["n_group"]
        scores = torch.sigmoid(x @ w[f"{p}.mlp.gate.weight"].T)  # [E]
        biased = scores + w[f"{p}.mlp.gate.expert_bias"]
        per = E // G
        group_score = [sum(sorted(biased[g * per:(g + 1) * per].tolist(), reverse=True)[:2]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg["topk_group"]]
        candidates = [e for e in range(E) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:k]
        total = sum(float(scores[e]) for e in chosen)
        out = torch.zeros_like(x)
        for e in chosen:
            out += (float(scores[e]) / total * cfg["routed_scaling_factor"]) * self.mlp(f"{p}.mlp.experts.{e}", x)
        if cfg.get("num_shared_experts"):
            out += self.mlp(f"{p}.mlp.shared_experts", x)
        return out

    def logits(self, ids: list[int], block: int | None) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        L, hd = len(ids), cfg["head_dim"]
        nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        x = w["model.word_embeddings.weight"][torch.tensor(ids)]  # [L, H]

        def sees(i, j):
            return block is None or j // block <= i // block

        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            h = self.rms(x, w[f"{p}.input_layernorm.weight"])
            qkv = h @ w[f"{p}.attention.query_key_value.weight"].T  # [L, (nq + 2 nkv) hd]
            if f"{p}.attention.query_key_value.bias" in w:
                qkv = qkv + w[f"{p}.attention.query_key_value.bias"]
            qkv = qkv.view(L, nq + 2 * nkv, hd)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            if cfg["use_qk_norm"]:
                q = self.rms(q, w[f"{p}.attention.query_layernorm.weight"])
                k = self.rms(k, w[f"{p}.attention.key_layernorm.weight"])
            q = torch.stack([torch.stack([self.rope(q[i, a], i) for a in range(nq)]) for i in range(L)])
            k = torch.stack([torch.stack([self.rope(k[i, a], i) for a in range(nkv)]) for i in range(L)])
            att = torch.zeros(L, nq, hd, dtype=x.dtype)
            for i in range(L):
                keys = [j for j in range(L) if sees(i, j)]
                for a in range(nq):
                    kv_head = a // (nq // nkv)
                    s = torch.stack([q[i, a] @ k[j, kv_head] for j in keys]) / math.sqrt(hd)
                    att[i, a] = torch.softmax(s, 0) @ torch.stack([v[j, kv_head] for j in keys])
            out = att.reshape(L, nq * hd) @ w[f"{p}.attention.dense.weight"].T
            if f"{p}.attention.dense.bias" in w:
                out = out + w[f"{p}.attention.dense.bias"]
            x = x + out
            h = self.rms(x, w[f"{p}.post_attention_layernorm.weight"])
            if layer < cfg["first_k_dense_replace"]:
                x = x + self.mlp(f"{p}.mlp", h)
            else:
                x = x + torch.stack([self.moe(p, h[i]) for i in range(L)])
        return self.rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def oracle_generate_llada2(logits_of, prompt: list[int], gen_length: int, block_length: int, steps_per_block: int,
                           threshold: float | None, mask_id: int, eos_id: int, editing_threshold: float | None = None,
                           max_post_steps: int = 16) -> list[int]:
    """LLaDA 2.0 (``editing_threshold=None``) or 2.1 decoding at temperature 0 of ONE row, as
    the reference ``generate()``: blocks of ``block_length`` aligned at position 0 (the prompt's
    last block may be partial; the last block runs past ``gen_length``); ``logits_of(ids)`` is
    the model over ``ids`` with block-causal attention. Returns the response up to (without)
    its first EOS, at most ``gen_length`` tokens.

    2.0: step k of a block transfers every masked prediction above ``threshold`` if there are
    at least n_k of them, else the n_k most confident (n_k: ``block_length`` spread over
    ``steps_per_block`` steps, capped at what is masked). 2.1: n_k = 1 (``steps`` ignored), and
    each pass also replaces a decoded, non-prompt token of the block whose new prediction
    differs with probability above ``editing_threshold``; after the block is unmasked, passes
    go on while they edit, at most ``max_post_steps``. Generation ends after the block in
    which an EOS appears."""
    P = len(prompt)
    num_blocks = -(-(P + gen_length) // block_length)
    x = list(prompt) + [mask_id] * (num_blocks * block_length - P)
    for b in range(P // block_length, num_blocks):
        start, end = b * block_length, (b + 1) * block_length
        step, post = 0, 0
        while True:
            old = x[start:end]
            masked = [i for i in range(start, end) if x[i] == mask_id]
            if editing_threshold is not None:
                if not masked:
                    post += 1
                if post > max_post_steps:
                    break
            elif not masked:
                break
            logits = logits_of(x[:end])
            probs = torch.softmax(logits.double(), -1)
            pred = {}
            for i in range(start, end):
                no_mask = logits[i].clone()
                no_mask[mask_id] = -math.inf
                token = int(no_mask.argmax())
                pred[i] = (token, float(probs[i, token]))
            if editing_threshold is None:
                n = block_length // steps_per_block + (1 if step < block_length % steps_per_block else 0)
            else:
                n = 1
            ranked = sorted(masked, key=lambda i: -pred[i][1])  # most confident first (ties: position order)
            high = [i for i in masked if threshold is not None and pred[i][1] > threshold]
            transfer = high if len(high) >= n else ranked[:min(n, len(masked))]
            edits = []
            if editing_threshold is not None:
                edits = [i for i in range(start, end) if i >= P and old[i - start] != mask_id
                         and pred[i][1] > editing_threshold and pred[i][0] != old[i - start]]
            for i in transfer + edits:
                x[i] = pred[i][0]
            step += 1
            if editing_threshold is not None and not masked and not edits:
                break
        if eos_id in x[P:end]:
            break
    response = x[P:P + gen_length]
    return response[:response.index(eos_id)] if eos_id in response else response
