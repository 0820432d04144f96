"""A slow, obviously-correct oracle of LLaDA's ``generate()``, written from the algorithm's
description (LLaDA paper, Appendix B, and the Sampler parity contract in DESIGN.md): one row
at a time, no padding, plain Python loops, one ``model(ids[None])`` call per forward pass.
The sampler tests compare the engine and ``illada_batch.generate`` with it token for token;
``bench_generate_vs_oracle.py`` times them against it.
"""

from __future__ import annotations

import random

import torch


def oracle_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0, threshold=None):
    """LLaDA's sampler at temperature 0 with low-confidence remasking, for ONE unpadded row.

    Returns (response tokens, states) where states[t] is the response after forward pass t+1.
    """
    mask_id = model.card.mask_token_id
    P = len(prompt)
    ids = list(prompt) + [mask_id] * gen_length
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    states = []

    def logits_of(tokens):  # [len(tokens), V] float64
        with torch.no_grad():
            return model(torch.tensor(tokens, dtype=torch.long)[None])[0].double()

    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        M = sum(1 for i in range(start, end) if ids[i] == mask_id)
        k = 0
        while any(ids[i] == mask_id for i in range(start, end)):
            if threshold is None:
                assert k < steps_per_block, "the fixed schedule must empty the block in steps_per_block steps"
                n = M // steps_per_block + (1 if k < M % steps_per_block else 0)
            logits = logits_of(ids)
            if cfg_scale > 0:
                unconditional = [mask_id] * P + ids[P:]  # every prompt token masked
                un = logits_of(unconditional)
                logits = un + (cfg_scale + 1) * (logits - un)
            candidates = []  # (confidence, position, predicted token)
            for i in range(start, end):
                if ids[i] != mask_id:
                    continue
                token = int(logits[i].argmax())
                assert token != mask_id, "test setup: the model must never predict the mask token"
                prob = float(torch.softmax(logits[i], dim=-1)[token])
                candidates.append((prob, i, token))
            candidates.sort(key=lambda c: -c[0])  # most confident first (stable: ties keep position order)
            if threshold is not None:
                n = max(1, sum(1 for c in candidates if c[0] >= threshold))
            for _, i, token in candidates[:n]:
                ids[i] = token
            states.append(ids[P:])
            k += 1
    return ids[P:], states


def make_prompts(lengths, seed, vocab_size, mask_id):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def left_pad(prompts, pad_id):
    """-> prompt_ids [B, Lp] left padded, attention_mask [B, Lp] (0 on padding)."""
    Lp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Lp), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), Lp), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Lp - len(p):] = torch.tensor(p)
        mask[i, Lp - len(p):] = 1
    return ids, mask
