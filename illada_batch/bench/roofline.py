"""``illada-batch bench --model-shape llada-8b --roofline h100|h200|a100``: a model of each
cache mode on a GPU, not a measurement.

The engine runs its real schedule on this CPU (fixed steps, EOS suppressed, so every row
runs gen_length steps; a 480-token shared prefix and 32-token prompts; gen 256, block 32,
one token per step) for each cache mode at batch 1, 16 and 64, and ``model/layers/traffic.py``
counts what each step ran: forwards, query tokens, output-head positions, and per layer the
attention's (query, key) pairs and the K/V token-layers read, written and copied. The step
sequence does not depend on the model's width, so it runs on a one-layer model of the tiny
width (LLaDA-8B's width would take this CPU hours a batch-64 step); the counts are priced at
the target shape (default LLaDA-8B: 32 layers, d 4096, 32 K/V heads of 128, bf16):

- FLOPs: 2 x query tokens x the blocks' matrix weights + 4 x (query, key) pairs x heads x
  head_dim + 2 x head positions x d x vocab;
- bytes: every weight once per forward; K/V read and written; a copy reads and writes its
  bytes (2x); activations are not counted (small beside the weights at these batches);
- a step takes max(FLOPs / peak FLOP/s, bytes / bandwidth): its bound. Launch overheads,
  kernel efficiency and the sampler are not modelled, so measured steps are slower.

Every block of this schedule runs the same steps (equal rows, EOS suppressed, one token per
step), so each run stops after its first block (``SAMPLE_BLOCKS``) and those steps stand for
the other blocks' (``schedule``; the prefix's one-time encoding is counted once): the whole
table takes minutes on this CPU instead of most of an hour, with the same totals (tested at
batch 2 against the whole run: tests/test_roofline.py).

Fast-dLLM's dual cache is modelled as the engine's ``blocks`` at batch 1 with the block-only
step copying each row's K/V per layer (``BlockCacheForward(paged=False)``, as its
concatenation does), to hold against its published 54 tok/s (A100, GSM8K, gen 256, with
parallel decoding: several tokens per step, so its tokens/s at one token per step is lower).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.configs.llada import PRESETS
from illada_batch.model.layers.traffic import Step, Traffic
from illada_batch.model.llada import LLaDA

GEN, BLOCK, PREFIX, PROMPT = 256, 32, 480, 32
BATCHES = (1, 16, 64)
SAMPLE_BLOCKS = 1  # blocks of each run counted (the others repeat them: ``schedule``)
FAST_DLLM_TOKENS_PER_S = 54.0  # published: LLaDA-8B, GSM8K, gen 256, dual cache + parallel decoding, A100


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16, published
    bandwidth: float  # HBM bytes/s, published


DEVICES = {"h100": Device("H100 SXM", 989e12, 3.35e12), "h200": Device("H200 SXM", 989e12, 4.8e12),
           "a100": Device("A100 80GB SXM", 312e12, 2.039e12)}


def flops_per_query_token(cfg) -> float:
    """Matrix FLOPs of one query position through a dense LLaDA config's blocks (attention
    scores excluded): two per weight."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d + 3 * d * cfg.mlp_hidden_size
    return 2.0 * cfg.n_layers * per_layer


def step_cost(s: Step, cfg, dtype_bytes: int = 2) -> dict:
    """One counted step priced at ``cfg``'s shape: FLOPs and bytes by kind."""
    scale = cfg.n_layers / max(1, s.layers)  # the counted layers stand for the target's
    token_layer = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    head = cfg.embedding_size * cfg.d_model
    flops = (s.query_tokens * flops_per_query_token(cfg) + 4 * s.attn_pairs * scale * cfg.n_heads * cfg.head_dim
             + 2 * s.logit_positions * head)
    weights = s.forwards * (flops_per_query_token(cfg) / 2 + head) * dtype_bytes
    return {"flops": flops, "weights": weights, "kv_read": s.kv_read * scale * token_layer,
            "kv_written": s.kv_written * scale * token_layer, "copied": s.kv_copied * scale * token_layer}


def predict(traffic: Traffic, cfg, device: Device, tokens: int, once: int = 0, repeat: int = 1) -> dict:
    """Each step's bound and time on ``device``; the run's totals and predicted tokens/s. The
    first ``once`` steps ran once, the rest stand for ``repeat`` times themselves (a sample)."""
    steps = [step_cost(s, cfg) for s in traffic.steps]
    for i, c in enumerate(steps):
        c["bytes"] = c["weights"] + c["kv_read"] + c["kv_written"] + 2 * c["copied"]
        c["compute_s"], c["memory_s"] = c["flops"] / device.peak_flops, c["bytes"] / device.bandwidth
        c["seconds"], c["bound"] = max(c["compute_s"], c["memory_s"]), "compute" if c["compute_s"] > c["memory_s"] else "memory"
        c["times"] = 1 if i < once else repeat
    seconds = sum(c["seconds"] * c["times"] for c in steps)
    total = {k: sum(c[k] * c["times"] for c in steps) for k in ("flops", "weights", "kv_read", "kv_written", "copied",
                                                                  "bytes")}
    return {"steps": sum(c["times"] for c in steps), "seconds": seconds, "tokens_per_s": tokens / seconds, **total,
            "compute_bound_steps": sum(c["times"] for c in steps if c["bound"] == "compute"),
            "copy_share": 2 * total["copied"] / total["bytes"], "per_step": steps}


class _Sampled(Exception):
    pass


class SampledTraffic(Traffic):
    """Counts the engine's one-time step (the prefix's encoding, closed right after the plan
    is chosen) and then ``limit`` denoising steps, and stops the run there."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.once = limit, None

    def end_step(self) -> None:
        super().end_step()
        if self.once is None:  # the engine's first close: right after the plan (the prefix's step, if any)
            self.once = len(self.steps)
        elif len(self.steps) - self.once >= self.limit:
            raise _Sampled


def schedule(cache: str, batch: int, paged: bool = True, blocks: int | None = SAMPLE_BLOCKS) -> tuple[Traffic, int, int]:
    """The engine's counted steps for ``batch`` rows (one full batch) in ``cache`` mode ->
    (traffic, once, repeat). Every block of this schedule runs the same steps (equal rows,
    EOS suppressed, one token per step: a refresh or full forward, then the block's other
    steps over the same keys), so with ``blocks`` the run stops after that many blocks and
    its denoising steps stand for GEN / (blocks x BLOCK) times themselves; None: the whole run."""
    cfg = replace(PRESETS["tiny"], d_model=64, n_heads=2, n_kv_heads=2, mlp_hidden_size=128, vocab_size=256,
                  embedding_size=256, n_layers=1, max_sequence_length=PREFIX + PROMPT + GEN)  # the schedule only
    torch.manual_seed(0)
    model = LLaDA(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prefix = tuple(torch.randint(3, cfg.vocab_size, (PREFIX,), generator=g).tolist())
    params = SamplingParams(steps=GEN, gen_length=GEN, block_length=BLOCK, suppress_eos=True, early_stop=False)
    reqs = [Request(str(i), tuple(torch.randint(3, cfg.vocab_size, (PROMPT,), generator=g).tolist()), prefix, params)
            for i in range(batch)]
    engine = Engine(model, cache=cache, max_batch_size=batch, paged=paged)
    if blocks is None:
        engine.run(reqs)
        return engine.traffic, len(engine.traffic.steps), 1
    engine.traffic = SampledTraffic(blocks * BLOCK)
    try:
        engine.run(reqs)
    except _Sampled:
        pass
    return engine.traffic, engine.traffic.once, GEN // (blocks * BLOCK)


def roofline(device_name: str, shape: str = "llada-8b", out_path: str = "roofline.json",
             blocks: int | None = SAMPLE_BLOCKS) -> int:
    device, cfg = DEVICES[device_name], PRESETS[shape]
    rows = []
    for cache in [m.value for m in CacheMode.concrete()]:
        for batch in BATCHES:
            traffic, once, repeat = schedule(cache, batch, blocks=blocks)
            rows.append({"cache": cache, "batch": batch, **predict(traffic, cfg, device, batch * GEN, once, repeat)})
    traffic, once, repeat = schedule("blocks", 1, paged=False, blocks=blocks)
    rows.append({"cache": "Fast-dLLM dual", "batch": 1, **predict(traffic, cfg, device, GEN, once, repeat)})
    print(f"Roofline of {shape} on {device.name} ({device.peak_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{device.bandwidth / 1e12:.2f} TB/s): a model, not a measurement. {PREFIX}-token shared prefix, "
          f"{PROMPT}-token prompts, gen {GEN}, block {BLOCK}, one token per step; schedule counted by the engine"
          + ("" if blocks is None else f" over its first {blocks} block(s), the others the same steps"))
    print(table(rows))
    fast = rows[-1]
    print(f"Fast-dLLM dual cache at batch 1 as modelled: {fast['tokens_per_s']:.0f} tok/s at one token per step "
          f"(published: {FAST_DLLM_TOKENS_PER_S:.0f} tok/s on an A100 with parallel decoding)")
    with open(out_path, "w") as f:
        json.dump({"device": device.name, "shape": shape, "rows": [{k: v for k, v in r.items() if k != "per_step"}
                                                                    for r in rows]}, f, indent=2)
    return 0


def table(rows: list[dict]) -> str:
    head = (f"{'cache':<16}{'batch':>6}{'steps':>6}{'TFLOP/step':>11}{'weights GB':>11}{'KV read GB':>11}"
            f"{'KV write GB':>12}{'copied GB':>10}{'compute-bound':>14}{'ms/step':>9}{'copy share':>11}{'tok/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        n = r["steps"]
        lines.append(f"{r['cache']:<16}{r['batch']:>6}{n:>6}{r['flops'] / n / 1e12:>11.2f}{r['weights'] / n / 1e9:>11.1f}"
                     f"{r['kv_read'] / n / 1e9:>11.2f}{r['kv_written'] / n / 1e9:>12.2f}{r['copied'] / n / 1e9:>10.2f}"
                     f"{r['compute_bound_steps']:>9}/{n:<4}{r['seconds'] / n * 1e3:>9.2f}{r['copy_share']:>11.1%}"
                     f"{r['tokens_per_s']:>9.0f}")
    return "\n".join(lines)
