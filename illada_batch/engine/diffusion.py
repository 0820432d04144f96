"""The batched engine a replica runs: many rows per forward, a shared prefix encoded once
into the paged KV cache, finished rows replaced by waiting ones.

Design note. Requests are grouped by (prefix, sampling parameters). For each group the
prefix is looked up page by page in the ``PagePool`` (chained hashes); pages that miss are
encoded once, attending only to the prefix itself, and written to the ``KVCache``. Every
row of the group then runs the one decoding loop (``decode.denoise_step``) with its
queries attending to [cached prefix K/V ; its own K/V]. When a row finishes (its blocks
are done, or it stopped at EOS) a waiting row of the group takes its slot. With
``cache="off"`` the same loop runs over ``[prefix | prompt | response]``. A prefix that
does not fit the cache budget is run with the cache off for that group, never an error.

A sample's random generator is seeded from (seed, request id, sample index), so its tokens
do not depend on its batch neighbours, the replica or the sharding.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict, deque
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from illada_batch.decoding.loop import DecodeBatch, denoise_step, row_generators
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.kv_cache import KVCache, pages_for_budget
from illada_batch.engine.pages import PagePool, PrefixPages
from illada_batch.engine.requests import Counters, Request, Result, request_problem, sample_seed
from illada_batch.model.checkpoint import load_model
from illada_batch.model.llada import LayerKV, LLaDA


class Engine:
    def __init__(self, model: LLaDA, cache: CacheMode | str = CacheMode.PREFIX, max_batch_size: int = 16,
                 kv_budget: int | float | None = None, page_size: int = 16, isolate_prefix: bool = False) -> None:
        """``kv_budget``: bytes (int) or a fraction of free device memory (float) for prefix
        pages; default 10% of free GPU memory on CUDA, 256 MiB on CPU.
        ``isolate_prefix``: with the cache off, let the prefix attend only to itself (a
        block-causal mask), which is what the prefix cache computes."""
        self.model, self.cache, self.max_batch_size = model, CacheMode(cache), max_batch_size
        self.tokenizer = model.tokenizer
        self.isolate_prefix = isolate_prefix
        self.counters = Counters()
        self.pool: PagePool | None = None
        self.kv: KVCache | None = None
        if self.cache is CacheMode.PREFIX:
            if kv_budget is None:
                kv_budget = 0.1 if model.device.type == "cuda" else 256 * 2**20
            num_pages = pages_for_budget(model.config, kv_budget, page_size, model.dtype, model.device)
            if num_pages >= 1:  # below one page every group falls back to the cache off
                self.pool = PagePool(num_pages, page_size)
                self.kv = KVCache(model.config, num_pages, page_size, model.device, model.dtype)
        self.model_key = f"{getattr(model, 'name_or_path', 'model')}:{model.dtype}"

    @classmethod
    def from_pretrained(cls, path: str | Path, cache: CacheMode | str = CacheMode.PREFIX, device=None, dtype=None,
                        **kwargs) -> "Engine":
        return cls(load_model(path, device=device, dtype=dtype), cache=cache, **kwargs)

    # --- the text API -----------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: SamplingParams | None = None, prefix: str | None = None,
                 n: int = 1, seed: int = 0, request_ids: Sequence[str] | None = None) -> list[Result]:
        """One result per (prompt, sample), in that order."""
        params = params or SamplingParams()
        tok = self._tok()
        prefix_ids = tuple(tok.encode(prefix)) if prefix else ()
        ids = request_ids or [str(i) for i in range(len(prompts))]
        encoded = tok.encode_batch(list(prompts))
        reqs = [Request(rid, tuple(p), prefix_ids, params, j, seed) for rid, p in zip(ids, encoded) for j in range(n)]
        return self.run(reqs)

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids to Engine.run")
        return self.tokenizer

    # --- the request API ----------------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> list[Result]:
        requests = list(requests)
        results: dict[int, Result] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            problem = self._check(r)
            if problem:
                results[i] = Result(r.request_id, r.sample_index, None, [], 0, "error", problem,
                                    sample_seed(r.seed, r.request_id, r.sample_index))
            else:
                groups[(r.prefix_ids, r.params)].append(i)
        for prefix_ids, params in groups:
            if params.cfg_scale > 0 and self.cache is CacheMode.PREFIX and prefix_ids:
                raise ValueError("cfg_scale > 0 masks the prefix too: use cache='off' with classifier-free guidance")
        for (prefix_ids, params), idx in groups.items():
            self._run_group(prefix_ids, replace(params, block_logits_only=True), [(i, requests[i]) for i in idx], results)
        return [results[i] for i in range(len(requests))]

    def _check(self, r: Request) -> str | None:
        return request_problem(r, self.model.config.max_sequence_length)

    @torch.no_grad()
    def _run_group(self, prefix_ids: tuple[int, ...], params: SamplingParams, todo: list[tuple[int, Request]],
                   results: dict[int, Result]) -> None:
        cfg, dev = self.model.config, self.model.device
        prefix_kv, alloc = self._encode_prefix(prefix_ids) if self.cache is CacheMode.PREFIX and prefix_ids else (None, None)
        cached = prefix_kv is not None
        # Without the cache, a prefix engine still lets the prefix attend only to itself, so a
        # group that fell back (over budget) computes what the cache would have.
        isolate = not cached and (self.isolate_prefix or self.cache is CacheMode.PREFIX)
        # Rows of similar length share a batch (less padding); a row's tokens do not depend on
        # its neighbours, so the order changes only the speed.
        queue, batch = deque(sorted(todo, key=lambda t: len(t[1].prompt_ids))), None
        if cached:
            self.counters.prefix_pages_read += len(todo) * (len(prefix_ids) // self.pool.page_size)
        t0 = time.perf_counter()
        while queue or batch is not None:
            room = self.max_batch_size - (batch.size if batch is not None else 0)
            if room and queue:
                new = [queue.popleft() for _ in range(min(room, len(queue)))]
                prompts = [list(r.prompt_ids) if cached else list(prefix_ids) + list(r.prompt_ids) for _, r in new]
                seeds = [sample_seed(r.seed, r.request_id, r.sample_index) for _, r in new]
                fresh = DecodeBatch.from_prompts(prompts, params, cfg.mask_token_id, cfg.pad_token_id,
                                                 row_generators(seeds, dev), dev,
                                                 position_offset=len(prefix_ids) if cached else 0,
                                                 prefix_lengths=None if cached else [len(prefix_ids)] * len(new),
                                                 tags=[(i, r, s) for (i, r), s in zip(new, seeds)])
                batch = fresh if batch is None else batch.extend(fresh, cfg.pad_token_id)
            denoise_step(self.model, batch, params, prefix_kv, isolate_prefix=isolate)
            self.counters.forward_passes += 1
            if bool(batch.done.any()):
                self._finish(batch, params, results)
                batch = batch.select(~batch.done) if not bool(batch.done.all()) else None
        self._sync()
        self.counters.seconds["decode"] += time.perf_counter() - t0
        if alloc is not None:
            self.pool.free(alloc)

    def _finish(self, batch: DecodeBatch, params: SamplingParams, results: dict[int, Result]) -> None:
        eos = self.model.config.eos_token_id
        responses = batch.x[:, -params.gen_length:].tolist()
        nfe = batch.nfe.tolist()
        for row in batch.done.nonzero().squeeze(-1).tolist():
            i, req, seed = batch.tags[row]
            resp = responses[row]
            stopped = eos in resp
            ids = resp[:resp.index(eos)] if stopped else resp
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else None
            results[i] = Result(req.request_id, req.sample_index, text, ids, nfe[row], "eos" if stopped else "length",
                                None, seed)
            self.counters.rows += 1
            self.counters.tokens += len(ids)

    def _encode_prefix(self, prefix_ids: tuple[int, ...]) -> tuple[list[LayerKV] | None, PrefixPages | None]:
        """Look the prefix up page by page; encode what missed (attending only to the prefix)."""
        t0 = time.perf_counter()
        # LLaDA is bidirectional: a page's K/V depend on the whole prefix, not only on the
        # tokens before it, so the whole prefix goes into the page key. Pages are shared by
        # every row and every later run with this prefix, never across different prefixes.
        key = f"{self.model_key}:{hashlib.blake2b(repr(prefix_ids).encode(), digest_size=8).hexdigest()}"
        alloc = self.pool.allocate(prefix_ids, key) if self.pool is not None else None
        if alloc is None:  # does not fit the budget: this group runs with the cache off
            self.counters.prefix_fallbacks += 1
            return None, None
        page = self.pool.page_size
        full = len(prefix_ids) // page
        hits = alloc.num_cached_tokens // page
        self.counters.prefix_pages_hit += hits
        self.counters.prefix_pages_missed += full - hits
        start = alloc.num_cached_tokens
        P = len(prefix_ids)
        if start < P:
            past = self.kv.read(alloc.pages, start) if start else None
            ids = torch.tensor(prefix_ids[start:], device=self.model.device)[None]  # [1, P - start]
            positions = torch.arange(start, P, device=self.model.device)[None]
            out = self.model.run(ids, positions=positions, prefix_kv=past, return_logits=False)
            self.kv.write(alloc.pages, start, [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in out.kv])
        kv = self.kv.read(alloc.pages, P)
        self._sync()
        self.counters.seconds["prefix"] += time.perf_counter() - t0
        return kv, alloc

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
