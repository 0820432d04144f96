"""The autoregressive backend: ``vllm.LLM`` behind the diffusion engine's request API
(``tokenizer``, ``run(requests) -> results``, ``counters``), so a replica runs it through the
same shard, render, write and commit code.

Design note. Prompts are encoded by the project's tokenizer (the same ids the diffusion path
sees) and handed to vLLM as token ids ``prefix + prompt``; vLLM's own prefix caching shares
the prefix's KV blocks between rows. Each sample gets its own vLLM seed,
``engine.sample_seed(job seed, row id, sample index)``, so its tokens do not depend on its
batch neighbours, the replica or the sharding. A result is the diffusion engine's
``Result``: the response up to its first EOS, finish reason ``eos`` or ``length`` (``error``
for a prompt too long for the model), ``steps`` = tokens decoded (one forward pass each).

vLLM is imported here only, when an engine is built: nothing else in the package needs it.
On CPU it needs ``gpu_memory_utilization`` near 0.1, ``VLLM_CPU_KVCACHE_SPACE`` (GiB), a
head dimension of at least 64 and writable cache directories; the engine runs inside this
process (no engine-core subprocess), so a killed replica leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from illada_batch.engine.requests import Counters, Request, Result, request_problem, sample_seed
from illada_batch.errors import VLLM_INSTALL
from illada_batch.model.tokenizer import Tokenizer


def _cache_root() -> Path:
    """A writable folder for vLLM's and torch inductor's compile caches (kept between runs:
    the second start of a model skips most of its compilation)."""
    base = Path(os.environ.get("ILLADA_CACHE", Path.home() / ".cache" / "illada_batch"))
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base)
        probe.close()
    except OSError:
        base = Path(tempfile.gettempdir()) / "illada_batch-cache"
        base.mkdir(parents=True, exist_ok=True)
    return base


def _set_environment(cpu: bool, kv_budget: float | None) -> None:
    """vLLM reads these when the engine is built; what the user set wins."""
    root = _cache_root()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if cpu:
        gib = 1 if kv_budget is None or kv_budget <= 1 else max(1, math.ceil(kv_budget / 2**30))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gib))
        # Replicas share the machine's cores: no pinning, OMP_NUM_THREADS (set by the driver) decides.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def eos_ids(model_dir: Path) -> list[int]:
    """EOS ids from ``config.json`` and ``generation_config.json`` (an int or a list in each)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        f = model_dir / name
        if f.exists():
            value = json.loads(f.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


class VLLMEngine:
    def __init__(self, model_dir: str | Path, *, prefix_cache: bool = True, max_batch_size: int = 16,
                 kv_budget: float | None = None, dtype: str = "auto", seed: int = 0) -> None:
        """``kv_budget``: GiB of KV cache from bytes (> 1) on CPU, or the fraction of GPU memory
        vLLM may use (<= 1) on a GPU; as ``EngineSpec.kv_budget``."""
        import torch

        model_dir = Path(model_dir)
        cpu = not torch.cuda.is_available()
        _set_environment(cpu, kv_budget)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(f"backend 'vllm' needs vLLM ({exc}): {VLLM_INSTALL}") from None

        util = 0.1 if cpu else (kv_budget if kv_budget is not None and kv_budget <= 1 else 0.9)
        self.llm = LLM(str(model_dir), enable_prefix_caching=prefix_cache, max_num_seqs=max_batch_size,
                       gpu_memory_utilization=util, dtype=dtype, seed=seed, disable_log_stats=False)
        self.tokenizer = Tokenizer(model_dir)
        vllm_eos = getattr(self.llm.get_tokenizer(), "eos_token_id", None)
        self.eos = sorted(set(eos_ids(model_dir)) | ({vllm_eos} if isinstance(vllm_eos, int) else set()))
        cfg = self.llm.llm_engine.vllm_config
        self.max_model_len = cfg.model_config.max_model_len
        self.page_size = cfg.cache_config.block_size
        self.counters = Counters()

    def run(self, requests: Iterable[Request]) -> list[Result]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = list(requests)
        results: dict[int, Result] = {}
        todo, prompts, params = [], [], []
        for i, r in enumerate(requests):
            seed = sample_seed(r.seed, r.request_id, r.sample_index)
            problem = self._check(r)
            if problem:
                results[i] = Result(r.request_id, r.sample_index, None, [], 0, "error", problem, seed)
                continue
            todo.append((i, r, seed))
            prompts.append(TokensPrompt(prompt_token_ids=list(r.prefix_ids) + list(r.prompt_ids)))
            p = r.params
            params.append(SamplingParams(max_tokens=p.gen_length, temperature=p.temperature, seed=seed,
                                         stop_token_ids=[] if p.suppress_eos else self.eos,
                                         ignore_eos=p.suppress_eos, detokenize=False))
        t0 = time.perf_counter()
        steps_before = self._engine_steps()
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        self.counters.seconds["decode"] += time.perf_counter() - t0
        self.counters.forward_passes += self._engine_steps() - steps_before
        for (i, r, seed), out in zip(todo, outputs):
            results[i] = self._result(r, seed, out)
        return [results[i] for i in range(len(requests))]

    def _check(self, r: Request) -> str | None:
        if r.template is not None:  # the job spec refuses it first; this guards the request API
            return "a response template needs the diffusion engine (vLLM generates left to right)"
        return request_problem(r, self.max_model_len)

    def _result(self, r: Request, seed: int, out) -> Result:
        c = out.outputs[0]
        ids = list(c.token_ids)
        stopped = c.finish_reason == "stop"
        cut = next((k for k, t in enumerate(ids) if t in self.eos), None) if stopped else None
        text_ids = ids if cut is None else ids[:cut]
        full_pages = (len(r.prefix_ids) + len(r.prompt_ids)) // self.page_size
        cached_pages = (out.num_cached_tokens or 0) // self.page_size
        self.counters.samples += 1
        self.counters.tokens += len(text_ids)
        self.counters.prefix_pages_read += full_pages
        self.counters.prefix_pages_hit += cached_pages
        self.counters.prefix_pages_missed += full_pages - cached_pages
        if c.finish_reason not in ("stop", "length"):
            return Result(r.request_id, r.sample_index, None, [], len(ids), "error",
                          f"vLLM finished the sample with {c.finish_reason!r}", seed)
        return Result(r.request_id, r.sample_index, self.tokenizer.decode(text_ids, skip_special_tokens=True),
                      text_ids, len(ids), "eos" if stopped else "length", None, seed)

    def _engine_steps(self) -> int:
        """Engine iterations so far (each one forward pass over the running batch)."""
        try:
            metrics = self.llm.get_metrics()
        except (AttributeError, AssertionError):  # a vLLM without the metrics API, or stats off
            return 0
        return next((int(m.count) for m in metrics if m.name == "vllm:iteration_tokens_total"), 0)

    def close(self) -> None:
        """Shut the engine down (frees its memory and worker resources); call before ``ray.shutdown``."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
