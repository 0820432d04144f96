"""The batched engine a replica runs: many rows per forward, a shared prefix encoded once
into the paged KV cache, finished rows replaced by waiting ones.

Design note. Requests are grouped by (prefix, sampling parameters). For each group a
cache plan is chosen once (``cache_plan.choose_plan``): the shared prefix read from pages
(``SharedPrefix``; pages that miss are encoded once, attending only to the prefix), or the
cache off (``NoCache``, also for a prefix that does not fit the KV budget: never an error),
or each row's K/V in its own pages (``BlockCache``, the ``blocks`` and ``prefix+blocks``
modes: a row takes pages when it joins and waits while they do not fit; its forward is a
refresh over its whole sequence at a block's first step, the block's tokens only otherwise;
both kinds are served every iteration as two forwards, see ``block_cache``'s note for the
measurement that chose it).
Then each engine step is three calls, as in nano-vllm's ``LLMEngine.step``: ``_schedule``
(waiting rows take free slots), ``denoise_step`` (one forward for the batch through the
plan's ``forward``, the one decoding loop's cache parameter), ``_postprocess`` (done rows
become results and leave the batch).

A sample's random generator is seeded from (seed, request id, sample index), so its tokens
do not depend on its batch neighbours, the replica or the sharding.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable, Sequence

import torch

from illada_batch.decoding.loop import DecodeBatch, denoise_step
from illada_batch.decoding.params import DEFAULT_KV_BUDGET, CacheMode, SamplingParams
from illada_batch.decoding.special_text import special_problem
from illada_batch.decoding.template import ResponseTemplate
from illada_batch.engine.cache_plan import BlockCausalCache, CachePlan, choose_plan
from illada_batch.engine.kv_cache import KVCache, pages_for_budget
from illada_batch.engine.pages import PagePool
from illada_batch.engine.requests import Counters, Request, Result, request_problem, sample_seed
from illada_batch.errors import ParamsError
from illada_batch.model.base import DiffusionLM
from illada_batch.model.checkpoint import load_model
from illada_batch.model.family import AttentionKind
from illada_batch.model.layers.traffic import Traffic, counting


class Engine:
    def __init__(self, model: DiffusionLM, cache: CacheMode | str = CacheMode.AUTO, max_batch_size: int = 16,
                 kv_budget: int | float | None = None, page_size: int = 16, paged: bool = True,
                 tensor_parallel_size: int = 1, prefill_chunk: int | None = None) -> None:
        """``cache``: ``auto`` (the default) is resolved once from the model's family card
        (``CacheMode.resolve``: the exact block-causal cache for block-causal models, ``prefix``
        otherwise); ``self.cache`` is the concrete mode, ``cache_text`` says it for people.
        ``kv_budget``: bytes (int) or a fraction of free device memory (float) for the
        pages (prefixes, and rows in the block cache modes); default 10% of free GPU memory
        on CUDA, 256 MiB on CPU. With ``prefix``, a budget under one page runs every group
        with the cache off, prefixes isolated (what the cache computes); the block cache
        modes need room for one row of the model's longest sequence. ``paged=False``: the block
        cache's block-only steps copy each row's K/V out of the pages (the reference path).
        ``tensor_parallel_size``: the ranks ``model`` is split over (``model.tp``); each rank's
        ``kv_budget`` holds the K/V of its own KV heads (``engine/tensor_parallel.py``).
        ``prefill_chunk``: block-causal models prefill at most that many prompt tokens per
        iteration (rounded down to whole blocks, at least one), so a long prompt joining does
        not stall the rows decoding; None: a row's whole prefill in its first forward. Speed
        only, never the tokens (``engine/prefill.py``)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ParamsError(f"prefill_chunk={prefill_chunk}: must be at least 1 token (None: no chunking)")
        if prefill_chunk is not None and model.card.attention is not AttentionKind.BLOCK_CAUSAL:
            raise ParamsError(f"prefill_chunk={prefill_chunk}: chunked prefill is for block-causal models; "
                              f"{model.card.family} attends bidirectionally and has no prefill to chunk")
        self.prefill_chunk = prefill_chunk
        ranks = 1 if model.tp is None else model.tp.size
        if ranks != tensor_parallel_size:
            raise ParamsError(f"tensor_parallel_size={tensor_parallel_size}, but the model is split over {ranks} "
                              "rank(s): build it with Engine.from_pretrained(..., tensor_parallel_size=N)")
        self.peers = None  # rank 0 of a tensor-parallel replica: the other ranks (tensor_parallel.Peers)
        self.requested_cache = CacheMode(cache)
        self.cache = self.requested_cache.resolve(model.card)
        self.model, self.max_batch_size, self.paged = model, max_batch_size, paged
        # Block-causal models get their exact cache (``engine/block_causal.py``) in every mode but off.
        self.block_causal = model.card.attention is AttentionKind.BLOCK_CAUSAL and self.cache is not CacheMode.OFF
        self.tokenizer = model.tokenizer
        self.counters = Counters()
        self.traffic = Traffic()  # what each step computed, read, wrote and copied (model/layers/traffic.py)
        self.pool: PagePool | None = None
        self.kv: KVCache | None = None
        if self.cache is not CacheMode.OFF:
            if kv_budget is None:
                kv_budget = DEFAULT_KV_BUDGET["cuda" if model.device.type == "cuda" else "cpu"]
            num_pages = pages_for_budget(model.card, kv_budget, page_size, model.dtype, model.device)
            self.kv_budget = kv_budget
            if self.cache.block_cache or self.block_causal:  # each row's K/V in pages
                self._check_row_fits(num_pages, page_size, model.card.longest_row())
            if num_pages >= 1:  # below one page every group falls back to the cache off
                self.pool = PagePool(num_pages, page_size)
                self.kv = KVCache(model.card, num_pages, page_size, model.device, model.dtype)
        self.model_key = f"{getattr(model, 'name_or_path', 'model')}:{model.dtype}"

    def _check_row_fits(self, num_pages: int, page_size: int, row_tokens: int) -> None:
        """Refuse a pool that cannot hold one row of ``row_tokens`` (its longest sequence): such
        a row would wait for pages forever."""
        need = -(-row_tokens // page_size)
        if num_pages < need:
            raise ParamsError(f"kv_budget={self.kv_budget}: {num_pages} pages, but cache '{self.cache_text}' needs "
                              f"{need} for one row of the model's longest sequence ({row_tokens} tokens)")

    @property
    def cache_text(self) -> str:
        """The cache as this engine runs it: ``auto -> prefix``, ``prefix (exact block-causal cache)``..."""
        return self.requested_cache.describe(self.model.card)

    @classmethod
    def from_pretrained(cls, path: str | Path, cache: CacheMode | str = CacheMode.AUTO, device=None, dtype=None,
                        tensor_parallel_size: int = 1, **kwargs) -> "Engine":
        """``tensor_parallel_size`` N > 1: this process is rank 0 of N, the others local
        processes (one thread each under ``ILLADA_THREADS``); ``close()`` ends them."""
        if tensor_parallel_size > 1:
            from illada_batch.engine.tensor_parallel import start_local

            return start_local(str(path), tensor_parallel_size, device, dtype, dict(cache=cache, **kwargs))
        return cls(load_model(path, device=device, dtype=dtype), cache=cache, **kwargs)

    def close(self) -> None:
        """End a tensor-parallel replica's other ranks (nothing to do otherwise)."""
        if self.peers is not None:
            self.peers.close()
            self.peers = None

    # --- the text API -----------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: SamplingParams | None = None, prefix: str | None = None,
                 n: int = 1, seed: int = 0, request_ids: Sequence[str] | None = None,
                 response_template: str | None = None) -> list[Result]:
        """One result per (prompt, sample), in that order. ``response_template``: the response's
        fixed text with ``{slot:N}`` slots (``decoding/template.py``); results then carry
        ``slots``. ParamsError when it has no slot or does not fit ``gen_length``."""
        params = params or SamplingParams()
        tok = self._tok()
        prefix_ids = tuple(tok.encode(prefix)) if prefix else ()
        ids = request_ids or [str(i) for i in range(len(prompts))]
        encoded = tok.encode_batch(list(prompts))
        template = None
        if response_template is not None:
            try:
                parsed = ResponseTemplate.parse(response_template)
                if parsed.columns:
                    raise ParamsError(f"{{{parsed.columns[0]}}} is a row column, which this call has none of: "
                                      f"only {{slot:N}} markers")
                problem = special_problem("its fixed text", response_template, tok.special_texts)
                if problem:
                    raise ParamsError(problem)
                template = parsed.tokenize(tok.encode)
            except ParamsError as exc:
                raise ParamsError(f"response_template: {exc}") from None
            if template.length > params.gen_length:
                raise ParamsError(f"response_template: {template.length} tokens > gen_length {params.gen_length}")
        reqs = [Request(rid, tuple(p), prefix_ids, params, j, seed, template)
                for rid, p in zip(ids, encoded) for j in range(n)]
        return self.run(reqs)

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids to Engine.run")
        return self.tokenizer

    # --- the request API ----------------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> list[Result]:
        requests = list(requests)
        if self.peers is None:
            return self._run(requests)
        from illada_batch.engine.tensor_parallel import agree

        try:
            self.peers.send(requests)  # every rank runs the same schedule over them
            results = self._run(requests)
            agree(results)
        except Exception as exc:
            getattr(self.peers, "broken", lambda exc: None)(exc)  # a rank gone takes the replica down
            raise
        return results

    def _run(self, requests: list[Request]) -> list[Result]:
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
            if params.cfg_scale > 0 and (self.cache.block_cache or self.block_causal
                                         or (self.cache is CacheMode.PREFIX and prefix_ids)):
                raise ParamsError(f"cfg_scale > 0 with cache '{self.cache_text}': classifier-free guidance masks "
                                 "the prompt and prefix, which the cache keeps unmasked; use cache='off'")
        for (prefix_ids, params), idx in groups.items():
            self._run_group(prefix_ids, params, [(i, requests[i]) for i in idx], results)
        return [results[i] for i in range(len(requests))]

    def _check(self, r: Request) -> str | None:
        if self.model.card.logit_shift and not r.prompt_ids and self.cache.shares_prefix:
            # the response's first token is predicted by the prefix's last state, which the
            # shared prefix's pages do not keep
            return (f"empty prompt: this model predicts each token from the state before it, and cache "
                    f"'{self.cache.value}' keeps no state of the shared prefix; give the row a prompt")
        return request_problem(r, self.model.card.max_sequence_length, self.model.card.mask_token_id)

    @torch.no_grad()
    def _run_group(self, prefix_ids: tuple[int, ...], params: SamplingParams, todo: list[tuple[int, Request]],
                   results: dict[int, Result]) -> None:
        with counting(self.traffic):
            self._run_counted(prefix_ids, params, todo, results)

    def _run_counted(self, prefix_ids: tuple[int, ...], params: SamplingParams, todo: list[tuple[int, Request]],
                     results: dict[int, Result]) -> None:
        params = self.model.card.resolve(params)  # the family's own defaults for settings left unset
        longest = max(len(r.prompt_ids) for _, r in todo) + params.gen_length
        plan = choose_plan(self.model, self.cache, prefix_ids, longest, self.pool, self.kv, self.model_key,
                           self.counters, self.paged, params, self.prefill_chunk)
        if isinstance(plan, BlockCausalCache):  # its rows' pages depend on the block: known only now
            self._check_row_fits(self.pool.num_pages, self.pool.page_size,
                                 self.model.card.longest_row(params.gen_length, params.block_length))
        self.traffic.end_step()  # the prefix's encoding, if any, is a step of its own
        if plan.prefix_pages is not None:  # every row reads the shared prefix's pages
            self.counters.prefix_pages_read += len(todo) * (len(prefix_ids) // self.pool.page_size)
        # Rows of similar length share a batch (less padding); a row's tokens do not depend on
        # its neighbours, so the order changes only the speed.
        queue, batch = deque(sorted(todo, key=lambda t: len(t[1].prompt_ids))), None
        t0 = time.perf_counter()
        while queue or batch is not None:
            batch = self._schedule(plan, params, queue, batch)
            if self.pool is not None:
                in_use = self.pool.num_pages - self.pool.num_free_pages
                self.counters.pages_in_use_peak = max(self.counters.pages_in_use_peak, in_use)
            denoise_step(self.model, batch, params, plan.forward)
            self.counters.forward_passes += 1
            self.traffic.end_step()
            batch = self._postprocess(plan, batch, params, results)
        self._sync()
        self.counters.seconds["decode"] += time.perf_counter() - t0
        self.counters.query_tokens += plan.forward.query_tokens
        self.counters.row_waits += plan.waits
        plan.close()

    def _schedule(self, plan: CachePlan, params: SamplingParams, queue: deque, batch: DecodeBatch | None) -> DecodeBatch:
        """Refill the batch: waiting rows take the free slots (and, in a block cache, pages)."""
        room = self.max_batch_size - (batch.size if batch is not None else 0)
        new = plan.take(queue, room, params) if room and queue else []
        if not new:
            if batch is None:  # cannot happen: the engine's pool holds one row of the longest sequence
                raise RuntimeError("no row fits the KV pages of an empty batch")
            return batch
        fresh = plan.new_rows(new, params, self.model)
        return fresh if batch is None else batch.extend(fresh, self.model.card.pad_token_id)

    def _postprocess(self, plan: CachePlan, batch: DecodeBatch, params: SamplingParams,
                     results: dict[int, Result]) -> DecodeBatch | None:
        """Finish the done rows: their results out, the rest of the batch kept."""
        if not bool(batch.done.any()):
            return batch
        self._finish(batch, params, results)
        for row in batch.done.nonzero().squeeze(-1).tolist():
            plan.release(batch.tags[row][0])
        return batch.select(~batch.done) if not bool(batch.done.all()) else None

    def _finish(self, batch: DecodeBatch, params: SamplingParams, results: dict[int, Result]) -> None:
        eos = self.model.card.eos_token_id
        responses = batch.responses(params)
        nfe = batch.nfe.tolist()
        for row in batch.done.nonzero().squeeze(-1).tolist():
            i, req, seed = batch.tags[row]
            try:
                results[i] = self._result(req, responses[row], eos, nfe[row], seed)
            except Exception as exc:  # noqa: BLE001 - one row's failure is its error, never its batch's
                results[i] = Result(req.request_id, req.sample_index, None, [], nfe[row], "error",
                                    f"cannot read the response: {type(exc).__name__}: {exc}", seed)
                continue
            self.counters.samples += 1
            self.counters.tokens += len(results[i].token_ids)

    def _result(self, req: Request, resp: list[int], eos: int, steps: int, seed: int) -> Result:
        slots = None
        if req.template is not None:  # fixed text as given, each slot up to its first EOS
            text, slots, ids, stopped = req.template.read(resp, eos, self._decode)
        else:
            stopped = eos in resp
            ids = resp[:resp.index(eos)] if stopped else resp
            text = self._decode(ids)
        return Result(req.request_id, req.sample_index, text, ids, steps, "eos" if stopped else "length", None, seed,
                      slots)

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else None

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
