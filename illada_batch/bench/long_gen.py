"""``illada-batch bench --only long``: long generations (gen_length 256 and 512, block 32,
threshold 0.9), where the block cache modes are meant to pay off. Rows of one task share a
400+-token few-shot prefix; EOS is suppressed so that every row really runs to its full
length (the tiny models answer in a few tokens). Each cache mode runs the same rows at batch
16 (8 at gen 512), the block modes also at batch 1 (fewer rows): tokens/s, rows/s, forwards and query
tokens per generated token, peak memory, agreement with ``off``. Every ratio printed
compares two runs of this command."""

from __future__ import annotations

from illada_batch.bench.measure import agreement, run_requests, table
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.tasks.evaluate import suite_requests, suite_rows


def long_params(gen: int) -> SamplingParams:
    return SamplingParams(steps=gen, gen_length=gen, block_length=32, threshold=0.9, suppress_eos=True,
                          early_stop=False)


def bench_long(model, caches: list[str], gen_lengths=(256, 512), rows: int = 16, batch: int = 16,
               few: int = 4) -> list[dict]:
    """``rows`` rows at batch ``batch`` per mode (half of them past gen_length 256); ``off``
    (the slowest by far) and the block modes at batch 1 run the first ``few`` rows, and the
    agreement with ``off`` is over those rows."""
    prefixes, suite = suite_rows(model.tokenizer, seed=50_000, rows_per_task=rows, prefixes_per_task=1,
                                 min_prefix_tokens=400, task_names=("reverse",))
    out = []
    for gen in gen_lengths:
        reqs = suite_requests(model.tokenizer, prefixes, suite, long_params(gen))[:rows if gen <= 256 else rows // 2]
        runs = [run_requests(model, cache, reqs[:few] if cache == "off" else reqs, batch)[0] for cache in caches]
        runs += [run_requests(model, cache, reqs[:few], 1)[0] for cache in caches if CacheMode(cache).block_cache]
        base = next((r for r in runs if r["cache"] == "off"), None)
        if base is not None:
            for r in runs:
                r["agree_rows"], r["agree_tokens"] = agreement(base["_tokens"], r["_tokens"][:few], gen)
        out += runs
        print(table(runs), flush=True)
        print(ratios(runs, batch), flush=True)
    return out


def ratios(runs: list[dict], batch: int) -> str:
    """The issue-14 targets, as ratios of runs of this command (one gen_length)."""
    at = {(r["cache"], r["batch"]): r for r in runs}
    lines = []
    pre = at.get(("prefix", batch))
    for mode in ("blocks", "prefix+blocks"):
        r, one = at.get((mode, batch)), at.get((mode, 1))
        if r and pre:
            lines.append(f"{mode} / prefix at batch {batch}: {r['tokens_per_s'] / pre['tokens_per_s']:.2f}x tokens/s, "
                         f"{r['query_per_token'] / pre['query_per_token']:.3f}x query tokens per generated token")
        if r and one:
            lines.append(f"{mode}, batch {batch} / batch 1: {r['rows_per_s'] / one['rows_per_s']:.2f}x rows/s")
    return "\n".join(lines)
