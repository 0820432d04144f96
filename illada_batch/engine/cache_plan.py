"""A group's cache plan: how its rows are laid out and how their forwards use the cache,
chosen once per group (rows sharing a prefix and sampling parameters) by ``choose_plan``.

- ``NoCache``: rows carry ``[prefix | prompt]``; every step runs the whole sequence. A
  prefix engine whose prefix did not fit the KV budget also lands here, with the prefix
  attending only to itself (``isolate_prefix``), so its rows compute what the cache would.
- ``SharedPrefix``: the prefix's K/V are read from pages once per group (encoded first where
  pages missed); rows carry ``[prompt]`` at positions after the prefix and attend to it.
- ``BlockCausalCache`` (block-causal models, every mode but ``off``): exact; each row's K/V
  in pages, its complete prompt blocks shared with other rows page by page
  (``block_causal``).
- ``BlockCache``: each row's own K/V in pages, taken when it joins (a row whose pages do not
  fit waits for a finishing row's) and freed when it finishes; ``block_cache.BlockCacheForward``
  refreshes them at each block start. Faithful (``blocks``): rows carry the prefix, so its
  K/V are computed in each row's context. Shared (``prefix+blocks``): the prefix's K/V come
  from ``SharedPrefix``'s pages (or, when they and one row do not fit, are encoded for the
  group alone: the same numbers) and rows carry ``[prompt]``.

A plan takes waiting rows (``take``), makes them a batch (``new_rows``), hands the loop its
forward (``forward``, the cache parameter of ``denoise_step``), releases a finished row
(``release``) and gives its pages back when the group ends (``close``).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque

import torch

from illada_batch.decoding.loop import DecodeBatch, FullForward, causal_block, row_generators
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.engine.block_cache import BlockCacheForward
from illada_batch.engine.block_causal import BlockCausalForward
from illada_batch.engine.kv_cache import KVCache
from illada_batch.engine.pages import PagePool, PrefixPages, RowPages
from illada_batch.engine.requests import Counters, Request, sample_seed
from illada_batch.model.base import DiffusionLM
from illada_batch.model.layers.attention import LayerKV

Waiting = deque[tuple[int, Request]]  # (the request's index in the run, the request)


class _Plan:
    prefix_pages: PrefixPages | None = None  # the shared prefix's pages every row reads, if any
    waits = 0  # times a row waited for pages

    def take(self, queue: Waiting, room: int, params: SamplingParams) -> list[tuple[int, Request]]:
        """Waiting rows that join the batch now (up to ``room``)."""
        return [queue.popleft() for _ in range(min(room, len(queue)))]

    def release(self, index: int) -> None:
        """The row ``index`` finished."""

    def close(self) -> None:
        """The group finished."""


class NoCache(_Plan):
    """Rows carry the prefix; every step runs ``[prefix | prompt | response]``."""

    def __init__(self, prefix_ids: tuple[int, ...], isolate_prefix: bool) -> None:
        self.prefix_ids = prefix_ids
        self.forward = FullForward(isolate_prefix=isolate_prefix)

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: DiffusionLM) -> DecodeBatch:
        return _batch(model, params, new, [list(self.prefix_ids) + list(r.prompt_ids) for _, r in new],
                      position_offset=0, prefix_lengths=[len(self.prefix_ids)] * len(new))


class SharedPrefix(_Plan):
    """Rows carry ``[prompt]`` and attend to the prefix's K/V, shared by every row."""

    def __init__(self, prefix_ids: tuple[int, ...], kv: list[LayerKV], pages: PrefixPages, pool: PagePool) -> None:
        self.prefix_ids, self.prefix_pages, self.pool = prefix_ids, pages, pool
        self.forward = FullForward(prefix_kv=kv)

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: DiffusionLM) -> DecodeBatch:
        return _batch(model, params, new, [list(r.prompt_ids) for _, r in new], position_offset=len(self.prefix_ids))

    def close(self) -> None:
        self.pool.free(self.prefix_pages)


class BlockCache(_Plan):
    """Each row's K/V in its own pages, refreshed at each block start. ``shared_kv``: the
    prefix's shared K/V (rows then carry ``[prompt]``); None: rows carry the prefix."""

    def __init__(self, prefix_ids: tuple[int, ...], shared_kv: list[LayerKV] | None, prefix_pages: PrefixPages | None,
                 pool: PagePool, kv: KVCache, paged: bool = True) -> None:
        self.prefix_ids, self.pool, self.prefix_pages = prefix_ids, pool, prefix_pages
        self.carried = () if shared_kv is not None else prefix_ids  # the prefix tokens each row carries
        self.offset = len(prefix_ids) - len(self.carried)  # positions before a row's first token
        self.forward = BlockCacheForward(kv, shared_kv, paged)
        self.row_pages: dict[int, RowPages] = {}

    def take(self, queue: Waiting, room: int, params: SamplingParams) -> list[tuple[int, Request]]:
        taken = []
        while queue and len(taken) < room:
            i, r = queue[0]
            pages = self.pool.allocate_row(len(self.carried) + len(r.prompt_ids) + params.gen_length)
            if pages is None:  # waits for a finishing row's pages
                self.waits += 1
                break
            self.row_pages[i] = pages
            taken.append(queue.popleft())
        return taken

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: DiffusionLM) -> DecodeBatch:
        return _batch(model, params, new, [list(self.carried) + list(r.prompt_ids) for _, r in new],
                      position_offset=self.offset, page_tables=[list(self.row_pages[i].pages) for i, _ in new])

    def release(self, index: int) -> None:
        self.pool.free(self.row_pages.pop(index))

    def close(self) -> None:
        assert not self.row_pages, f"rows {sorted(self.row_pages)} still hold pages at the group's end"
        if self.prefix_pages is not None:
            self.pool.free(self.prefix_pages)


class BlockCausalCache(_Plan):
    """Block-causal families: each row's K/V in pages, exact (``block_causal``). A row's
    complete prompt blocks (the prefix is part of them: rows carry ``[prefix | prompt]``) are
    keyed page by page, each page's key running to the end of its block, so rows sharing a
    leading system prompt share its pages, and later rows reuse whatever is still in the pool;
    its other pages are private. A row that does not fit waits for a finishing row's pages.
    ``prefill_chunk``: at most that many prompt tokens prefilled per iteration (``prefill``)."""

    def __init__(self, prefix_ids: tuple[int, ...], pool: PagePool, kv: KVCache, block: int, model_key: str,
                 counters: Counters, prefill_chunk: int | None = None) -> None:
        self.prefix_ids, self.pool, self.block, self.counters = prefix_ids, pool, block, counters
        self.key = f"{model_key}:block-causal:{block}"  # K/V depend on the block size: never shared across sizes
        self.forward = BlockCausalForward(kv, block, pool.page_size, prefill_chunk)
        self.row_pages: dict[int, PrefixPages] = {}

    def take(self, queue: Waiting, room: int, params: SamplingParams) -> list[tuple[int, Request]]:
        taken = []
        while queue and len(taken) < room:
            i, r = queue[0]
            tokens = self.prefix_ids + tuple(r.prompt_ids)
            complete = len(tokens) // self.block * self.block  # the window starts here (decoding/loop.py)
            pages = self.pool.allocate(tokens[:complete], self.key, complete + params.gen_length + params.block_length,
                                       self.block)
            if pages is None:  # waits for a finishing row's pages
                self.waits += 1
                break
            hits = pages.num_cached_tokens // self.pool.page_size
            self.counters.prefix_pages_hit += hits
            self.counters.prefix_pages_missed += len(pages.hashes) - hits
            self.counters.prefix_pages_read += len(pages.hashes)  # the row's shareable pages, hit or not
            self.row_pages[i] = pages
            self.forward.schedule.join(i, pages)
            taken.append(queue.popleft())
        return taken

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: DiffusionLM) -> DecodeBatch:
        return _batch(model, params, new, [list(self.prefix_ids) + list(r.prompt_ids) for _, r in new],
                      position_offset=0, page_tables=[list(self.row_pages[i].pages) for i, _ in new])

    def release(self, index: int) -> None:
        self.pool.free(self.row_pages.pop(index))
        self.forward.schedule.leave(index)

    def close(self) -> None:
        assert not self.row_pages, f"rows {sorted(self.row_pages)} still hold pages at the group's end"


CachePlan = NoCache | SharedPrefix | BlockCache | BlockCausalCache


def _batch(model: DiffusionLM, params: SamplingParams, new: list[tuple[int, Request]], prompts: list[list[int]],
           position_offset: int, prefix_lengths: list[int] | None = None,
           page_tables: list[list[int]] | None = None) -> DecodeBatch:
    card = model.card
    seeds = [sample_seed(r.seed, r.request_id, r.sample_index) for _, r in new]
    responses = [None if r.template is None else r.template.layout(params.gen_length, card.mask_token_id,
                                                                    card.eos_token_id) for _, r in new]
    return DecodeBatch.from_prompts(prompts, params, card.mask_token_id, card.pad_token_id,
                                    row_generators(seeds, model.device), model.device, position_offset=position_offset,
                                    prefix_lengths=prefix_lengths, tags=[(i, r, s) for (i, r), s in zip(new, seeds)],
                                    page_tables=page_tables, responses=responses,
                                    aligned=causal_block(model, params) is not None)


def choose_plan(model: DiffusionLM, mode: CacheMode, prefix_ids: tuple[int, ...], longest_row: int, pool: PagePool | None,
                kv: KVCache | None, model_key: str, counters: Counters,
                paged: bool = True, params: SamplingParams | None = None, prefill_chunk: int | None = None) -> CachePlan:
    """The plan for one group. ``longest_row``: the most tokens one of its rows holds
    (prompt + gen_length, prefix excluded). The shared prefix comes from pages when the mode
    shares it and it fits the pool (a block cache also needs room for one row beside it);
    otherwise the cache off with the prefix isolated (``prefix``), or the prefix's K/V
    encoded for this group alone (``prefix+blocks``): either way the same numbers. ``paged``:
    the block cache reads pages in place (False: copies them, ``BlockCacheForward``).
    A block-causal model (its card's attention, whatever its family) gets its exact cache in
    every mode but ``off``, when its attention block is the sampler's ``block_length``
    (``prefill_chunk``: its prefill token budget per iteration, ``engine/prefill.py``)."""
    block = None if params is None else causal_block(model, params)
    if mode is not CacheMode.OFF and pool is not None and block is not None:
        if block == params.block_length:
            return BlockCausalCache(prefix_ids, pool, kv, block, model_key, counters, prefill_chunk)
        return NoCache(prefix_ids, isolate_prefix=False)
    if mode is CacheMode.BLOCKS or (mode.block_cache and not prefix_ids):
        return BlockCache(prefix_ids, None, None, pool, kv, paged)
    if not (mode.shares_prefix and prefix_ids):
        return NoCache(prefix_ids, isolate_prefix=False)
    # DiffusionLM is bidirectional: a page's K/V depend on the whole prefix, not only on the
    # tokens before it, so the whole prefix goes into the page key. Pages are shared by
    # every row and every later run with this prefix, never across different prefixes.
    key = f"{model_key}:{hashlib.blake2b(repr(prefix_ids).encode(), digest_size=8).hexdigest()}"
    pages = pool.allocate(prefix_ids, key) if pool is not None else None
    if pages is not None and mode.block_cache and pool.num_free_pages < -(-longest_row // pool.page_size):
        pool.free(pages)  # the prefix would leave no room for a row
        pages = None
    if pages is None:  # does not fit the budget
        counters.prefix_fallbacks += 1
        if mode.block_cache:
            return BlockCache(prefix_ids, encode_isolated(model, prefix_ids), None, pool, kv, paged)
        return NoCache(prefix_ids, isolate_prefix=True)
    prefix_kv = encode_prefix(model, kv, pages, prefix_ids, counters)
    if mode.block_cache:
        return BlockCache(prefix_ids, prefix_kv, pages, pool, kv, paged)
    return SharedPrefix(prefix_ids, prefix_kv, pages, pool)


def encode_isolated(model: DiffusionLM, prefix_ids: tuple[int, ...]) -> list[LayerKV]:
    """The prefix's K/V (per layer [P, Hkv, hd]), attending only to itself, without pages."""
    got: list[LayerKV] = []

    def keep(layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerKV:  # k, v [1, Hkv, P, hd]
        got.append((k[0].transpose(0, 1), v[0].transpose(0, 1)))
        return k, v

    model.run(torch.tensor(prefix_ids, device=model.device)[None], return_logits=False, kv_hook=keep)
    return got


def encode_prefix(model: DiffusionLM, kv: KVCache, pages: PrefixPages, prefix_ids: tuple[int, ...],
                  counters: Counters) -> list[LayerKV]:
    """Encode the prefix's pages that missed (attending only to the prefix), then read the
    whole prefix's K/V (per layer [P, Hkv, hd])."""
    t0 = time.perf_counter()
    page, P = kv.page_size, len(prefix_ids)
    hits = pages.num_cached_tokens // page
    counters.prefix_pages_hit += hits
    counters.prefix_pages_missed += P // page - hits
    start = pages.num_cached_tokens
    if start < P:
        past = kv.read(pages.pages, start) if start else None
        ids = torch.tensor(prefix_ids[start:], device=model.device)[None]  # [1, P - start]
        positions = torch.arange(start, P, device=model.device)[None]  # [1, P - start]
        slots = kv.slots(pages.pages, start, P)  # [P - start]

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerKV:  # k, v [1, Hkv, P - start, hd]
            kv.write_slots(layer, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return k, v

        model.run(ids, positions=positions, prefix_kv=past, return_logits=False, kv_hook=store)
    prefix_kv = kv.read(pages.pages, P)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    counters.seconds["prefix"] += time.perf_counter() - t0
    return prefix_kv
