"""Tokens/s of illada_batch.generate against the tests' oracle, same model, prompts and
outputs (cache off, temperature 0). Not a test: run `.venv/bin/python tests/bench_generate_vs_oracle.py`."""

import time

import torch
from oracle import oracle_generate  # tests/, this script's folder

from illada_batch import generate, load_model
from illada_batch.tasks.evaluate import suite_rows

torch.set_num_threads(1)
m = load_model("tiny-llada")
tok = m.tokenizer
prefixes, rows = suite_rows(tok, seed=50_000, rows_per_task=2, prefixes_per_task=1)
prompts = [tok.encode(prefixes[r.prefix_id]) + tok.encode(r.prompt) for r in rows]
G = 32
t0 = time.perf_counter()
ref = [oracle_generate(m, p, G, G, G)[0] for p in prompts]
t_oracle = time.perf_counter() - t0
L = max(map(len, prompts))
ids = torch.full((len(prompts), L), m.config.pad_token_id)
am = torch.zeros_like(ids, dtype=torch.bool)
for i, p in enumerate(prompts):
    ids[i, L - len(p):], am[i, L - len(p):] = torch.tensor(p), True
t0 = time.perf_counter()
out = generate(m, ids, am, steps=G, gen_length=G, block_length=G)
t_batch = time.perf_counter() - t0
t0 = time.perf_counter()
one = [generate(m, torch.tensor([p]), steps=G, gen_length=G, block_length=G) for p in prompts]
t_one = time.perf_counter() - t0
tokens = len(prompts) * G
same_b = sum(out[i, L:].tolist() == list(ref[i]) for i in range(len(prompts)))
same_1 = sum(o[0, len(p):].tolist() == list(r) for o, p, r in zip(one, prompts, ref))
print(f"{len(prompts)} rows, prefixes of 400+ tokens, {G} positions each, 1 thread")
print(f"  oracle (one row, full logits)             {tokens / t_oracle:7.1f} tok/s")
print(f"  generate, batch {len(prompts)}                       {tokens / t_batch:7.1f} tok/s  "
      f"{t_oracle / t_batch:.2f}x  identical {same_b}/{len(prompts)}")
print(f"  generate, one row                        {tokens / t_one:7.1f} tok/s  "
      f"{t_oracle / t_one:.2f}x  identical {same_1}/{len(prompts)}")
