"""A group's cache plan: how its rows are laid out and how their forwards use the cache,
chosen once per group (rows sharing a prefix and sampling parameters) by ``choose_plan``.

- ``NoCache``: rows carry ``[prefix | prompt]``; every step runs the whole sequence. A
  prefix engine whose prefix did not fit the KV budget also lands here, with the prefix
  attending only to itself (``isolate_prefix``), so its rows compute what the cache would.
- ``SharedPrefix``: the prefix's K/V are read from pages once per group (encoded first where
  pages missed); rows carry ``[prompt]`` at positions after the prefix and attend to it.

A plan makes a group's new rows (``new_rows``), hands the loop its forward (``forward``,
the cache parameter of ``denoise_step``) and gives its pages back when the group ends
(``close``).
"""

from __future__ import annotations

import hashlib
import time

import torch

from illada_batch.decoding.loop import DecodeBatch, FullForward, row_generators
from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.kv_cache import KVCache
from illada_batch.engine.pages import PagePool, PrefixPages
from illada_batch.engine.requests import Counters, Request, sample_seed
from illada_batch.model.llada import LayerKV, LLaDA


class NoCache:
    """Rows carry the prefix; every step runs ``[prefix | prompt | response]``."""

    def __init__(self, prefix_ids: tuple[int, ...], isolate_prefix: bool) -> None:
        self.prefix_ids = prefix_ids
        self.forward = FullForward(isolate_prefix=isolate_prefix)

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: LLaDA) -> DecodeBatch:
        return _batch(model, params, new, [list(self.prefix_ids) + list(r.prompt_ids) for _, r in new],
                      position_offset=0, prefix_lengths=[len(self.prefix_ids)] * len(new))

    def close(self) -> None:
        pass


class SharedPrefix:
    """Rows carry ``[prompt]`` and attend to the prefix's K/V, shared by every row."""

    def __init__(self, prefix_ids: tuple[int, ...], kv: list[LayerKV], pages: PrefixPages, pool: PagePool) -> None:
        self.prefix_ids, self.pages, self.pool = prefix_ids, pages, pool
        self.forward = FullForward(prefix_kv=kv)

    def new_rows(self, new: list[tuple[int, Request]], params: SamplingParams, model: LLaDA) -> DecodeBatch:
        return _batch(model, params, new, [list(r.prompt_ids) for _, r in new], position_offset=len(self.prefix_ids))

    def close(self) -> None:
        self.pool.free(self.pages)


CachePlan = NoCache | SharedPrefix


def _batch(model: LLaDA, params: SamplingParams, new: list[tuple[int, Request]], prompts: list[list[int]],
           position_offset: int, prefix_lengths: list[int] | None = None) -> DecodeBatch:
    cfg = model.config
    seeds = [sample_seed(r.seed, r.request_id, r.sample_index) for _, r in new]
    return DecodeBatch.from_prompts(prompts, params, cfg.mask_token_id, cfg.pad_token_id,
                                    row_generators(seeds, model.device), model.device, position_offset=position_offset,
                                    prefix_lengths=prefix_lengths, tags=[(i, r, s) for (i, r), s in zip(new, seeds)])


def choose_plan(model: LLaDA, prefix_ids: tuple[int, ...], prefix_cache: bool, pool: PagePool | None,
                kv: KVCache | None, model_key: str, counters: Counters) -> CachePlan:
    """The plan for one group: the shared prefix from pages when the engine caches prefixes
    and the prefix fits the pool, else the cache off (prefix isolated on a prefix engine)."""
    if not (prefix_cache and prefix_ids):
        return NoCache(prefix_ids, isolate_prefix=False)
    # LLaDA is bidirectional: a page's K/V depend on the whole prefix, not only on the
    # tokens before it, so the whole prefix goes into the page key. Pages are shared by
    # every row and every later run with this prefix, never across different prefixes.
    key = f"{model_key}:{hashlib.blake2b(repr(prefix_ids).encode(), digest_size=8).hexdigest()}"
    pages = pool.allocate(prefix_ids, key) if pool is not None else None
    if pages is None:  # does not fit the budget: this group runs with the cache off
        counters.prefix_fallbacks += 1
        return NoCache(prefix_ids, isolate_prefix=True)
    return SharedPrefix(prefix_ids, encode_prefix(model, kv, pages, prefix_ids, counters), pages, pool)


def encode_prefix(model: LLaDA, kv: KVCache, pages: PrefixPages, prefix_ids: tuple[int, ...],
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
        out = model.run(ids, positions=positions, prefix_kv=past, return_logits=False)
        kv.write(pages.pages, start, [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in out.kv])
    prefix_kv = kv.read(pages.pages, P)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    counters.seconds["prefix"] += time.perf_counter() - t0
    return prefix_kv
