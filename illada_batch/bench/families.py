"""``illada-batch bench --only families``: every registered family's tiny random checkpoint
(written to a temporary directory by the bench itself, with the writer the CLI hands it:
``train/`` is beside ``bench/``, not below it), the same task-suite rows at batch 1
and batch 16, gen_length 32 in 32 fixed steps (no early stop: random weights, so every row
generates all 32 tokens), in each cache mode the engine accepts for the family (a mode it
refuses, e.g. a bidirectional cache for a block-causal family, is listed with its reason).

Reports tokens/s and peak memory over the weights' bytes. "Peak" is the process's peak
RSS growth from just before the engine is built to the end of the run: the KV pages the run
touched, activations and logits, and the allocator's slack; not the weights (already
resident) nor torch itself. The allocator keeps memory freed by earlier runs, so a run's
growth can read lower than the same run in a fresh process."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from illada_batch.bench.measure import peak_bytes, peak_reset, run_requests, strip
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.errors import ParamsError
from illada_batch.model.checkpoint import load_model
from illada_batch.model.registry import FAMILIES
from illada_batch.tasks.evaluate import suite_requests, suite_rows

GEN = 32
BATCHES = (1, 16)


def rss_bytes() -> int:
    """The process's resident set now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def refusal(model, cache: str) -> str | None:
    """Why the engine refuses ``cache`` for this model (None: it runs). The engine holds the
    rule (the family card's attention kind), so this table follows it."""
    try:
        Engine(model, cache=cache, max_batch_size=1)
    except ParamsError as exc:
        return str(exc)
    return None


def bench_family(model, rows: int, caches: list[str], batches=BATCHES) -> tuple[list[dict], dict[str, str]]:
    """(one measurement per accepted cache mode x batch, {refused mode: reason})."""
    prefixes, suite = suite_rows(model.tokenizer, seed=50_000, rows_per_task=max(1, -(-rows // 5)),
                                 prefixes_per_task=1, min_prefix_tokens=64)
    params = SamplingParams(steps=GEN, gen_length=GEN, block_length=GEN, early_stop=False)
    reqs = suite_requests(model.tokenizer, prefixes, suite[:rows], params)
    weights, out, refused = weight_bytes(model), [], {}
    for cache in caches:
        why = refusal(model, cache)
        if why is not None:
            refused[cache] = why
            continue
        for batch in batches:
            peak_reset()
            before = rss_bytes()
            r, _ = run_requests(model, cache, reqs, batch)
            r["peak_growth_mb"] = max(0, peak_bytes() - before) / 2**20
            r["peak_over_weights"] = max(0, peak_bytes() - before) / weights
            out.append(r)
    return out, refused


def bench_families(write_tiny: Callable[[str, Path], Path], rows: int, caches: list[str],
                   families: list[str] | None = None) -> dict:
    """Every family (or ``families``): its card's facts, its runs and refusals.
    ``write_tiny(family name, directory)`` writes the family's tiny checkpoint there."""
    report = {}
    for family in FAMILIES:
        if families is not None and family.name not in families:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"illada-{family.name}-"))
        try:
            model = load_model(write_tiny(family.name, tmp / family.name), device="cpu")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        runs, refused = bench_family(model, rows, caches)
        report[family.name] = {"attention": model.card.attention.value, "weights_mb": weight_bytes(model) / 2**20,
                               "parameters": model.card.parameters, "active_parameters": model.card.active_parameters,
                               "runs": strip(runs), "refused": refused}
    return report


def table(report: dict) -> str:
    head = f"{'family':<11}{'attention':<15}{'weights MB':>11}  {'cache':<14}{'rows':>5}{'tok/s b1':>10}" \
           f"{'tok/s b16':>10}{'b16/b1':>8}{'peak/weights b1':>17}{'b16':>8}"
    lines = [head, "-" * len(head)]
    for name, f in report.items():
        by = {(r["cache"], r["batch"]): r for r in f["runs"]}
        for cache in dict.fromkeys(r["cache"] for r in f["runs"]):
            one, many = by.get((cache, 1)), by.get((cache, 16))
            if one is None or many is None:
                continue
            lines.append(f"{name:<11}{f['attention']:<15}{f['weights_mb']:>11.2f}  {cache:<14}{one['rows']:>5}"
                         f"{one['tokens_per_s']:>10.1f}{many['tokens_per_s']:>10.1f}"
                         f"{many['tokens_per_s'] / one['tokens_per_s']:>7.2f}x{one['peak_over_weights']:>16.1f}x"
                         f"{many['peak_over_weights']:>7.1f}x")
        for cache, why in f["refused"].items():
            lines.append(f"{name:<11}{f['attention']:<15}{'':>11}  {cache:<14} refused: {why.split(';')[0]}")
    lines.append(f"gen_length {GEN}, {GEN} fixed steps, no early stop, CPU; peak = peak RSS growth while the engine "
                 f"runs (KV pages touched, activations, logits, allocator slack), over the weights' bytes")
    return "\n".join(lines)
