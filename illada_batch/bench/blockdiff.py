"""``illada-batch bench --only blockdiff``: the exact block-causal cache (``engine/block_causal.py``)
against the cache off, on the tiny LLaDA 2.x checkpoint (``cli`` writes it to a temporary folder, with a 4k context), CPU.

Rows share a 400-token system prompt and differ after it (random token ids: the model is
random, so text would not be more telling); EOS is suppressed and early stop off, so every
row runs to its full length. For gen 256 and 1024 and batch 1, 16 and 64, the exact cache
runs one full batch of rows (``rows`` caps the rows of a cell: a batch larger than that is
skipped, never reported over fewer rows); the cache-off loop runs the same rows at the same
batch for its first ``OFF_STEPS`` steps only (every step of it runs the whole sequence, so
its cost per step is flat and a few steps stand for the run; said in the table). Then the
page hit rate for system prompts of several lengths, and how a long prompt joining stalls
the rows decoding, with and without chunked prefill (``prefill_stall``). Every ratio
compares two runs of this command; tokens equal the cache off exactly
(``tests/test_block_causal.py``)."""

from __future__ import annotations

import random
import time

from illada_batch.bench.measure import peak_bytes, peak_reset, run_requests, strip
from illada_batch.bench.prefill_stall import bench_stall
from illada_batch.decoding.loop import DecodeBatch, denoise_step, row_generators
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request, sample_seed

BLOCK = 32
OFF_STEPS = {256: 8, 1024: 4}  # steps of the cache-off loop timed per cell
SYSTEM, LONGEST_TAIL = 400, 40  # rows: a shared system prompt, then 8 to 39 tokens of their own


def _rows(n: int, system: int, seed: int, vocab: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(system)]
    return [tuple(shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, LONGEST_TAIL))]) for _ in range(n)]


def _requests(prompts, params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", p, (), params, 0, 0) for i, p in enumerate(prompts)]


def off_sampled(model, reqs: list[Request], steps: int) -> dict:
    """The cache-off loop (``denoise_step`` over the whole sequence) on ``reqs`` as one batch,
    timed over its first ``steps`` steps: tokens/s, query tokens per generated token, peak memory."""
    card, params = model.card, model.card.resolve(reqs[0].params)
    seeds = [sample_seed(r.seed, r.request_id, r.sample_index) for r in reqs]
    batch = DecodeBatch.from_prompts([list(r.prompt_ids) for r in reqs], params, card.mask_token_id, card.pad_token_id,
                                     row_generators(seeds, model.device), model.device, aligned=True)
    masked = int((batch.x == card.mask_token_id).sum())
    peak_reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        denoise_step(model, batch, params)
    seconds = time.perf_counter() - t0
    tokens = max(1, masked - int((batch.x == card.mask_token_id).sum()))
    return {"tokens_per_s": tokens / seconds, "query_per_token": batch.x.numel() * steps / tokens,
            "peak_mb": peak_bytes() / 2**20, "steps": steps}


def _speed(model, rows: int, gens, batches) -> list[dict]:
    out = []
    head = (f"{'gen':>5}{'batch':>6}{'rows':>5}{'exact tok/s':>12}{'off tok/s':>10}{'speedup':>8}{'rows/s':>8}"
            f"{'query/tok':>10}{'off query/tok':>14}{'peak MB':>8}{'off peak MB':>12}")
    print(f"{head}\n{'-' * len(head)}", flush=True)
    for gen in gens:
        if SYSTEM + LONGEST_TAIL + gen > model.card.max_sequence_length:
            print(f"{gen:>5}  skipped: a {SYSTEM}-token system prompt, up to {LONGEST_TAIL} more and gen {gen} pass the "
                  f"model's {model.card.max_sequence_length} tokens", flush=True)
            continue
        params = SamplingParams(steps=gen, gen_length=gen, block_length=BLOCK, threshold=0.9, suppress_eos=True,
                                early_stop=False)
        reqs = _requests(_rows(max(batches), SYSTEM, seed=gen, vocab=model.card.vocab_size), params)
        for batch in batches:
            if batch > rows:
                print(f"{gen:>5}{batch:>6}  skipped: --rows {rows} holds no batch of {batch}", flush=True)
                continue
            exact = run_requests(model, "prefix", reqs[:batch], batch)[0]
            off = off_sampled(model, reqs[:batch], OFF_STEPS.get(gen, 4))
            cell = {"gen": gen, "batch": batch, "rows": batch, "exact": strip([exact])[0], "off_sampled": off,
                    "speedup": exact["tokens_per_s"] / off["tokens_per_s"]}
            print(f"{gen:>5}{batch:>6}{batch:>5}{exact['tokens_per_s']:>12.1f}{off['tokens_per_s']:>10.1f}"
                  f"{cell['speedup']:>7.1f}x{exact['rows_per_s']:>8.2f}{exact['query_per_token']:>10.2f}"
                  f"{off['query_per_token']:>14.1f}{exact['peak_mb']:>8.0f}{off['peak_mb']:>12.0f}", flush=True)
            out.append(cell)
    print(f"(off: the cache-off loop over the same rows at the same batch, timed over its first "
          f"{', '.join(f'{s} steps at gen {g}' for g, s in OFF_STEPS.items())}; peak MB: the process's peak RSS)",
          flush=True)
    return out


def _hit_rates(model, rows: int, systems) -> list[dict]:
    out = []
    for system in systems:
        params = SamplingParams(steps=8, gen_length=BLOCK, block_length=BLOCK, suppress_eos=True, early_stop=False)
        engine = Engine(model, cache="prefix", max_batch_size=16)
        engine.run(_requests(_rows(rows, system, seed=system, vocab=model.card.vocab_size), params))
        c, ps = engine.counters, engine.pool.page_size
        system_pages = system // BLOCK * BLOCK // ps  # pages of blocks the system prompt fills alone
        hit = {"system_tokens": system, "rows": rows, "hit_rate": c.prefix_pages_hit / max(1, c.prefix_pages_read),
               "system_hit_rate": c.prefix_pages_hit / max(1, (rows - 1) * system_pages)}  # rows after the first
        print(f"system prompt {system} tokens, {rows} rows differing after it: page hit rate {hit['hit_rate']:.3f} "
              f"of every complete prompt page, {hit['system_hit_rate']:.3f} of the system prompt's pages in rows "
              f"after the first", flush=True)
        out.append(hit)
    return out


def bench_blockdiff(model, rows: int = 64, gens=(256, 1024), batches=(1, 16, 64),
                    systems=(64, 100, 400, 1000)) -> dict:
    room = model.card.max_sequence_length - LONGEST_TAIL - BLOCK  # the longest system prompt a row fits beside
    return {"speed": _speed(model, rows, gens, batches),
            "hit_rates": _hit_rates(model, min(rows, 16), [s for s in systems if s <= room]),
            "stall": bench_stall(model, BLOCK, long_prompt=min(2000, model.card.max_sequence_length - 256))}
