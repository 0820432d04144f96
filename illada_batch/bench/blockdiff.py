"""``illada-batch bench --only blockdiff``: the exact block-causal cache (``engine/block_causal.py``)
against the cache off, on the tiny LLaDA 2.x checkpoint (``cli`` writes it to a temporary folder), CPU.

Rows share a system prompt and differ after it (random token ids: the model is random, so
text would not be more telling); EOS is suppressed so every row runs to its full length.
Each gen_length runs the same rows with the cache off and with the exact cache at batch 16,
and the exact cache at batch 1: tokens/s, rows/s, query tokens per generated token, peak
memory, agreement with off (it is exact: 100%); then the page hit rate for system prompts of
several lengths. Every ratio compares two runs of this command."""

from __future__ import annotations

import random

from illada_batch.bench.measure import agreement, run_requests, strip, table
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request

BLOCK = 32


def _rows(n: int, system: int, seed: int, vocab: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(system)]
    return [tuple(shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))]) for _ in range(n)]


def _requests(prompts, params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", p, (), params, 0, 0) for i, p in enumerate(prompts)]


def bench_blockdiff(model, rows: int = 16, gens=(256,), systems=(100, 400), batch: int = 16) -> dict:
    out = {"runs": [], "hit_rates": []}
    vocab = model.card.vocab_size
    for gen in gens:
        params = SamplingParams(steps=gen, gen_length=gen, block_length=BLOCK, threshold=0.9, suppress_eos=True,
                                early_stop=False)
        reqs = _requests(_rows(rows, 400, seed=gen, vocab=vocab), params)
        off = run_requests(model, "off", reqs, batch)[0]
        runs = [off, run_requests(model, "prefix", reqs, batch)[0], run_requests(model, "prefix", reqs, 1)[0]]
        runs[1]["cache"] = runs[2]["cache"] = "exact-blocks"
        for r in runs:
            r["agree_rows"], r["agree_tokens"] = agreement(off["_tokens"], r["_tokens"], gen)
        print(table(runs), flush=True)
        exact, one = runs[1], runs[2]
        print(f"gen {gen}: exact cache / off at batch {batch}: {exact['tokens_per_s'] / off['tokens_per_s']:.2f}x "
              f"tokens/s; query tokens per generated token {exact['query_per_token']:.2f} "
              f"(off {off['query_per_token']:.1f}); batch {batch} / batch 1: "
              f"{exact['rows_per_s'] / one['rows_per_s']:.2f}x rows/s", flush=True)
        out["runs"] += strip(runs)
    for system in systems:
        params = SamplingParams(steps=8, gen_length=BLOCK, block_length=BLOCK, suppress_eos=True, early_stop=False)
        engine = Engine(model, cache="prefix", max_batch_size=batch)
        engine.run(_requests(_rows(rows, system, seed=system, vocab=vocab), params))
        c, ps = engine.counters, engine.pool.page_size
        system_pages = system // BLOCK * BLOCK // ps  # pages of blocks the system prompt fills alone
        hit = {"system_tokens": system, "rows": rows, "hit_rate": c.prefix_pages_hit / max(1, c.prefix_pages_read),
               "system_hit_rate": c.prefix_pages_hit / max(1, (rows - 1) * system_pages)}  # rows after the first
        print(f"system prompt {system} tokens, {rows} rows differing after it: page hit rate {hit['hit_rate']:.3f} "
              f"of every complete prompt page, {hit['system_hit_rate']:.3f} of the system prompt's pages in rows after the first", flush=True)
        out["hit_rates"].append(hit)
    return out
