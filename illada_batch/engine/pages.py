"""Page pool for a paged KV cache with hash-based prefix reuse.

A *page* holds the K/V of ``page_size`` consecutive tokens. This module only
does bookkeeping (which page ids are used, shared, cached or free); the K/V
tensors live in ``kv_cache.KVCache``. Modelled on nano-vllm's block manager and vLLM v1's block pool.

Two kinds of allocation share the pool: a prefix's pages (:meth:`PagePool.allocate`,
hashed and shareable) and a row's own pages for the block cache
(:meth:`PagePool.allocate_row`: private, never hashed, ref count 1, rewritten at every
block start). Both come back as ``None`` when they do not fit, and go back through
:meth:`PagePool.free`.

Contract with the caller of :meth:`PagePool.allocate`: full pages that come
back fresh are registered in the prefix cache immediately, so the caller must
write their K/V (``pages[num_cached_tokens // page_size:]``) before any other
allocation's K/V reads happen, e.g. in the same forward pass that follows.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import NewType, Sequence

PageId = NewType("PageId", int)
PageHash = NewType("PageHash", int)

_HASH_DOMAIN = b"illada-page-v1"


def hash_page(parent: PageHash | None, token_ids: Sequence[int], model_key: str) -> PageHash:
    """Chained 64-bit hash of one page; stable across processes and runs.

    Covers the parent page's hash (so a hash names the whole prefix up to and
    including this page), the model key, and the page's token ids.
    """
    key = model_key.encode("utf-8")
    h = hashlib.blake2b(_HASH_DOMAIN, digest_size=8)
    h.update(b"\x00" * 9 if parent is None else b"\x01" + struct.pack("<Q", parent))
    h.update(struct.pack("<Q", len(key)) + key)
    h.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    return PageHash(int.from_bytes(h.digest(), "little"))


def _key_end(page: int, page_size: int, block: int | None) -> int:
    """End of the tokens that key page ``page``: its own, or up to the end of the block
    holding its last token (block-causal K/V depend on them)."""
    end = (page + 1) * page_size
    return end if block is None else -(-end // block) * block


@dataclass(frozen=True)
class PrefixPages:
    """The page table of one allocation, as returned by :meth:`PagePool.allocate`."""

    pages: tuple[PageId, ...]  # token order; len == ceil(num_tokens / page_size)
    num_tokens: int  # the tokens the pages hold (past the hashed ones: private, never shared)
    num_cached_tokens: int  # leading tokens whose K/V already exist; multiple of page_size
    hashes: tuple[PageHash, ...]  # one per FULL page of the token ids: len == len(token_ids) // page_size


@dataclass(frozen=True)
class RowPages:
    """One row's own pages (block cache), as returned by :meth:`PagePool.allocate_row`."""

    pages: tuple[PageId, ...]  # token order; len == ceil(num_tokens / page_size)
    num_tokens: int


class PagePool:
    """Fixed set of page ids with ref counts, an LRU free list and a prefix cache."""

    def __init__(self, num_pages: int, page_size: int = 16) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self._num_pages = num_pages
        self._page_size = page_size
        # ref[p] >= 0; ref[p] == number of occurrences of p across live allocations.
        self._ref: list[int] = [0] * num_pages
        # Exactly the pages with ref 0, each once; front = least recently used
        # (evicted first), back = most recently freed.
        self._free: OrderedDict[PageId, None] = OrderedDict((PageId(p), None) for p in range(num_pages))
        # Prefix cache: _cached[h] == p  <=>  _page_hash[p] == h (a bijection), and
        # h == hash_page(_page_parent[p], _page_tokens[p], _page_model[p]).
        self._cached: dict[PageHash, PageId] = {}
        self._page_hash: list[PageHash | None] = [None] * num_pages
        self._page_parent: list[PageHash | None] = [None] * num_pages
        self._page_tokens: list[tuple[int, ...] | None] = [None] * num_pages
        self._page_model: list[str | None] = [None] * num_pages
        # Multiset of handed-out, not yet freed allocations (detects double free). A
        # RowPages' pages are each referenced once, by it alone, and carry no hash.
        self._live: Counter[PrefixPages | RowPages] = Counter()
        self._hits = 0
        self._misses = 0

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def ref_count(self, page: PageId) -> int:
        return self._ref[page]

    def hit_stats(self) -> tuple[int, int]:
        """(pages hit, pages missed) over the pool's life; each page of a
        successful allocate counts once: hit if reused, missed if fresh."""
        return self._hits, self._misses

    def free_page_ids(self) -> tuple[PageId, ...]:
        """Free pages in eviction order (next page to be taken first)."""
        return tuple(self._free)

    def cached_page(self, page_hash: PageHash) -> PageId | None:
        """The page currently registered under ``page_hash``, if any."""
        return self._cached.get(page_hash)

    def allocate(self, token_ids: Sequence[int], model_key: str, num_tokens: int | None = None,
                 block: int | None = None) -> PrefixPages | None:
        """Page table for ``token_ids``, reusing the longest run of cached leading
        full pages; ``None`` (pool untouched) if the fresh pages do not fit.

        ``num_tokens`` (default ``len(token_ids)``): pages for that many tokens, those past
        ``token_ids``' full pages private (never hashed). ``block`` (block-causal models, whose
        K/V of a token depend on the tokens up to the end of its block): a page's key covers
        its tokens and the rest of its block, so ``token_ids`` must end on a block boundary
        (complete blocks only; a page of an incomplete block is never shared)."""
        ps = self._page_size
        n = len(token_ids)
        if block is not None and n % block:
            raise ValueError(f"PagePool.allocate: {n} tokens are not whole blocks of {block}: a page of an "
                             "incomplete block has no final K/V to share")
        num_tokens = n if num_tokens is None else num_tokens
        if num_tokens < n:
            raise ValueError(f"PagePool.allocate: num_tokens {num_tokens} < the {n} token ids")
        num_full, num_needed = n // ps, -(-num_tokens // ps)
        chunks = [tuple(token_ids[i * ps : _key_end(i, ps, block)]) for i in range(num_full)]
        hashes: list[PageHash] = []
        parent: PageHash | None = None
        for chunk in chunks:
            parent = hash_page(parent, chunk, model_key)
            hashes.append(parent)

        hit: list[PageId] = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            hit.append(page)
        num_fresh = num_needed - len(hit)
        free_hits = sum(1 for p in hit if self._ref[p] == 0)
        if num_fresh > len(self._free) - free_hits:
            return None  # nothing above mutated state

        # Commit: from here on every step succeeds.
        for p in hit:
            if self._ref[p] == 0:
                del self._free[p]
            self._ref[p] += 1
        pages = list(hit)
        for i in range(len(hit), num_needed):
            page, _ = self._free.popitem(last=False)
            self._forget(page)  # evict whatever prefix it cached
            self._ref[page] = 1
            pages.append(page)
            if i < num_full:
                self._register(page, hashes[i], hashes[i - 1] if i else None, chunks[i], model_key)
        self._hits += len(hit)
        self._misses += num_fresh
        result = PrefixPages(tuple(pages), num_tokens, len(hit) * ps, tuple(hashes))
        self._live[result] += 1
        return result

    def allocate_row(self, num_tokens: int) -> RowPages | None:
        """Private pages for ``num_tokens`` tokens of one row (least recently used free
        pages first, evicting what they cached); ``None`` (pool untouched) if they do not fit."""
        needed = -(-num_tokens // self._page_size)
        if needed > len(self._free):
            return None
        pages = []
        for _ in range(needed):
            page, _ = self._free.popitem(last=False)
            self._forget(page)
            self._ref[page] = 1
            pages.append(page)
        result = RowPages(tuple(pages), num_tokens)
        self._live[result] += 1
        return result

    def free(self, prefix: PrefixPages | RowPages) -> None:
        """Drop one reference to each page of ``prefix``. Pages reaching 0 go to
        the most-recently-used end, tail first, so a prefix's tail is evicted
        before its head; cached pages stay reusable until evicted. A row's pages
        hold nothing reusable: they go to the least-recently-used end, taken first."""
        if self._live[prefix] == 0:  # Counter lookups insert nothing
            raise ValueError(
                f"PagePool.free: caller freed a {type(prefix).__name__} that is not live in this pool "
                f"(double free, or never allocated here): pages={prefix.pages}"
            )
        self._live[prefix] -= 1
        if self._live[prefix] == 0:
            del self._live[prefix]
        for page in reversed(prefix.pages):
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None
                if isinstance(prefix, RowPages):
                    self._free.move_to_end(page, last=False)

    def _register(
        self, page: PageId, h: PageHash, parent: PageHash | None, tokens: tuple[int, ...], model_key: str
    ) -> None:
        """Cache ``page`` under ``h``, unless a live page already holds ``h``;
        a free page holding ``h`` hands the entry over to the live one."""
        owner = self._cached.get(h)
        if owner is not None:
            if self._ref[owner] > 0:
                return
            self._forget(owner)
        self._cached[h] = page
        self._page_hash[page] = h
        self._page_parent[page] = parent
        self._page_tokens[page] = tokens
        self._page_model[page] = model_key

    def _forget(self, page: PageId) -> None:
        h = self._page_hash[page]
        if h is not None:
            del self._cached[h]
        self._page_hash[page] = self._page_parent[page] = None
        self._page_tokens[page] = self._page_model[page] = None

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        n = self._num_pages
        assert len(self._ref) == n, f"ref table has {len(self._ref)} entries, pool has {n} pages"
        for p, r in enumerate(self._ref):
            assert r >= 0, f"page {p} has negative ref count {r}"
            assert (r == 0) == (p in self._free), f"page {p}: ref {r} but in free list: {p in self._free}"
        assert all(0 <= p < n for p in self._free), f"free list holds unknown page ids: {list(self._free)}"
        used = sum(1 for r in self._ref if r > 0)
        assert len(self._free) + used == n, f"free {len(self._free)} + referenced {used} != {n} pages"
        live_refs = Counter(p for prefix, k in self._live.items() for p in prefix.pages for _ in range(k))
        for alloc in self._live:
            if isinstance(alloc, RowPages):
                assert len(alloc.pages) == -(-alloc.num_tokens // self._page_size), f"row pages {alloc} miscounted"
                for p in alloc.pages:
                    assert self._ref[p] == 1, f"row page {p} is shared (ref {self._ref[p]})"
                    assert self._page_hash[p] is None, f"row page {p} carries a prefix hash"
        for p in range(n):
            assert live_refs[p] == self._ref[p], f"page {p}: ref {self._ref[p]} but {live_refs[p]} live uses"
        for h, p in self._cached.items():
            assert self._page_hash[p] == h, f"cache maps {h:#x} to page {p}, which records {self._page_hash[p]}"
            tokens, model = self._page_tokens[p], self._page_model[p]
            assert tokens is not None and model is not None, f"cached page {p} has no recorded tokens"
            assert len(tokens) >= self._page_size, f"cached page {p} is keyed by {len(tokens)} tokens, not a full page"
            again = hash_page(self._page_parent[p], tokens, model)
            assert again == h, f"cached page {p}: stored tokens hash to {again:#x}, not {h:#x}"
        hashed = [p for p in range(n) if self._page_hash[p] is not None]
        assert len(hashed) == len(self._cached), (
            f"{len(hashed)} pages record a hash but the cache has {len(self._cached)} entries "
            "(a page kept a stale hash, or two pages share one)"
        )
        assert self._hits >= 0 and self._misses >= 0, f"negative hit stats {self.hit_stats()}"
