"""What every benchmark table measures: one engine over a list of requests (speed, work per
generated token, peak memory), token agreement between two runs, and the table itself."""

from __future__ import annotations

import time

import torch

from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) on Linux
        except OSError:
            pass


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_requests(model, cache: str, reqs: list[Request], batch: int) -> tuple[dict, list]:
    """One engine over ``reqs``: speed, forwards and query tokens per generated token,
    prefix hits, peak memory; and the results."""
    engine = Engine(model, cache=cache, max_batch_size=batch)
    peak_reset()
    t0 = time.perf_counter()
    results = engine.run(reqs)
    seconds = time.perf_counter() - t0
    c, p, card = engine.counters, reqs[0].params, model.card
    token_layer = card.kv_bytes_per_token(model.dtype.itemsize) // max(1, card.n_layers)  # one token's K and V of one layer
    nfe = sum(res.steps for res in results)
    tokens = max(1, sum(len(res.token_ids) + (res.finish_reason == "eos") for res in results))  # text + its EOS
    return {"cache": str(getattr(cache, "value", cache)), "decoding": "threshold" if p.threshold else "fixed",
            "gen": p.gen_length, "batch": batch, "rows": len(reqs), "seconds": seconds,
            "rows_per_s": len(reqs) / seconds, "tokens_per_s": tokens / seconds,
            "steps_per_token": nfe / tokens, "query_per_token": c.query_tokens / tokens,
            "copied_per_token": engine.traffic.total("kv_copied") * token_layer / tokens,  # K/V bytes copied
            "prefix_hit_rate": 1 - c.prefix_pages_missed / c.prefix_pages_read if c.prefix_pages_read else None,
            "peak_mb": peak_bytes() / 2**20, "accuracy": None, "forward_passes": c.forward_passes,
            "_tokens": [res.token_ids for res in results], "_traffic": engine.traffic}, results


def agreement(a: list[list[int]], b: list[list[int]], gen: int) -> tuple[float, float]:
    """(rows with identical tokens, positions with identical tokens) as fractions."""
    same_rows = sum(x == y for x, y in zip(a, b)) / len(a)
    pos = sum(sum(p == q for p, q in zip(x + [-1] * (gen - len(x)), y + [-1] * (gen - len(y)))) for x, y in zip(a, b))
    return same_rows, pos / (gen * len(a))


def with_agreement(modes: list[dict], base: dict) -> list[dict]:
    """Each mode's token agreement with ``base`` (a run over the same rows, cache off)."""
    for r in modes:
        r["agree_rows"], r["agree_tokens"] = agreement(base["_tokens"], r["_tokens"], r["gen"])
    return modes


def table(modes: list[dict]) -> str:
    head = f"{'cache':<14}{'decoding':<10}{'gen':>4}{'batch':>6}{'rows/s':>8}{'tok/s':>9}{'fwd/tok':>8}" \
           f"{'query/tok':>10}{'copy KB/tok':>12}{'hit rate':>9}{'peak MB':>8}{'accuracy':>9}{'agree rows':>11}{'agree tok':>10}"
    lines = [head, "-" * len(head)]
    for r in modes:
        hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        agree = ("-", "-") if r.get("agree_rows") is None else (f"{r['agree_rows']:.1%}", f"{r['agree_tokens']:.1%}")
        lines.append(f"{r['cache']:<14}{r['decoding']:<10}{r['gen']:>4}{r['batch']:>6}{r['rows_per_s']:>8.2f}"
                     f"{r['tokens_per_s']:>9.1f}{r['steps_per_token']:>8.2f}{r['query_per_token']:>10.1f}"
                     f"{r['copied_per_token'] / 1024:>12.1f}{hit:>9}"
                     f"{r['peak_mb']:>8.0f}{acc:>9}{agree[0]:>11}{agree[1]:>10}")
    return "\n".join(lines)


def strip(modes: list[dict]) -> list[dict]:
    """The rows for JSON (without the token lists)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in modes]
