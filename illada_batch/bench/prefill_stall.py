"""How a long prompt joining stalls the rows decoding, with and without chunked prefill
(``Engine(prefill_chunk=...)``, ``engine/prefill.py``), on the exact block-causal cache.

Eight rows with short prompts start decoding and a 2,000-token prompt joins in the same
iteration (one batch of nine). Every iteration is one forward (``block_causal``), timed here
by wrapping the model's ``run``. The short rows decode in every iteration from their first,
so their tokens/s is their tokens over the iterations until the last of them finished; the
stall is the longest iteration, which every decoding row waits for its next token. The
short rows alone give the baseline."""

from __future__ import annotations

import random
import time

import torch

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request


def _timed_run(model, engine: Engine, reqs: list[Request]) -> tuple[list, list[float]]:
    times, run = [], model.run

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = run(*args, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - t0)
        return out

    model.run = timed  # an instance attribute over the method, removed below
    try:
        results = engine.run(reqs)
    finally:
        del model.run
    return results, times


def bench_stall(model, block: int, decoding: int = 8, long_prompt: int = 2000, gen: int = 128,
                chunks=(None, 4 * 32)) -> list[dict]:
    rng = random.Random(0)
    vocab = model.card.vocab_size
    params = SamplingParams(steps=gen, gen_length=gen, block_length=block, threshold=0.9, suppress_eos=True,
                            early_stop=False)
    short = [Request(f"s{i}", tuple(rng.randrange(3, vocab) for _ in range(20)), (), params, 0, 0)
             for i in range(decoding)]
    long = Request("long", tuple(rng.randrange(3, vocab) for _ in range(long_prompt)), (), params, 0, 0)
    out = []
    for label, reqs, chunk in [("short rows alone", short, None)] + [
            (f"+ {long_prompt}-token prompt, " + ("whole prefill" if c is None else f"prefill_chunk {c}"), short + [long], c)
            for c in chunks]:
        engine = Engine(model, cache="prefix", max_batch_size=decoding + 1, prefill_chunk=chunk)
        results, times = _timed_run(model, engine, reqs)
        mine = [r for r in results if r.request_id != "long"]
        until = max(r.steps for r in mine)  # they decode in every iteration from the first
        tokens = sum(len(r.token_ids) for r in mine)
        row = {"run": label, "prefill_chunk": chunk, "iterations": len(times),
               "decoding_tokens_per_s": tokens / sum(times[:until]), "stall_ms": 1000 * max(times),
               "median_ms": 1000 * sorted(times)[len(times) // 2]}
        print(f"{label:<44} decoding rows {row['decoding_tokens_per_s']:7.1f} tok/s, longest iteration "
              f"{row['stall_ms']:7.1f} ms (median {row['median_ms']:.1f} ms, {row['iterations']} iterations)", flush=True)
        out.append(row)
    return out
