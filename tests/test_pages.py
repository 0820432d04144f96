"""Tests for the paged-KV page pool: exact scenarios plus a stateful model check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from illada_batch.engine import pages as pages_mod
from illada_batch.engine.pages import PageHash, PageId, PagePool, PrefixPages, RowPages, hash_page

KEY = "llada-8b-instruct"
A40 = list(range(100, 140))  # 2 full pages + 8-token partial page at page_size 16


def snapshot(pool: PagePool, hashes=()) -> tuple:
    """Everything observable about the pool (cache entries for the given hashes)."""
    return (
        pool.free_page_ids(),
        tuple(pool.ref_count(PageId(p)) for p in range(pool.num_pages)),
        pool.hit_stats(),
        pool.num_free_pages,
        tuple(pool.cached_page(h) for h in hashes),
    )


def chained(tokens, page_size, key, block=None) -> list[PageHash]:
    """The chain as written out by hand: page i keyed by its tokens, or (``block``) by the
    tokens from its start to the end of the block holding its last token."""
    out, parent = [], None
    for i in range(len(tokens) // page_size):
        end = (i + 1) * page_size if block is None else -(-(i + 1) * page_size // block) * block
        parent = hash_page(parent, tokens[i * page_size : end], key)
        out.append(parent)
    return out


# ---------------------------------------------------------------- hash_page


def test_hash_is_chained_and_keyed():
    h0 = hash_page(None, [1, 2, 3], KEY)
    assert h0 == hash_page(None, (1, 2, 3), KEY)
    assert 0 <= h0 < 2**64
    assert hash_page(h0, [4, 5], KEY) != hash_page(None, [4, 5], KEY)  # parent matters
    assert hash_page(None, [1, 2, 3], "other-model") != h0
    assert hash_page(None, [1, 2, 4], KEY) != h0
    assert hash_page(None, [1, 2], KEY) != hash_page(None, [1, 2, 0], KEY)


def test_hash_is_stable_across_processes():
    # load pages.py by path so the subprocess does not pay for the package's heavy imports
    code = (
        "import importlib.util as u, sys;"
        "s = u.spec_from_file_location('pages', sys.argv[1]); m = sys.modules['pages'] = u.module_from_spec(s); s.loader.exec_module(m);"
        f"h = m.hash_page(None, [1, 2, 3], {KEY!r}); print(h, m.hash_page(h, [7] * 16, {KEY!r}))"
    )
    outs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-c", code, pages_mod.__file__]
        outs.add(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip())
    h = hash_page(None, [1, 2, 3], KEY)
    assert outs == {f"{h} {hash_page(h, [7] * 16, KEY)}"}


# ---------------------------------------------------------------- scenarios


def test_fresh_pool_hands_out_pages_in_order():
    pool = PagePool(8)
    a = pool.allocate(A40, KEY)
    assert a == PrefixPages((0, 1, 2), 40, 0, tuple(chained(A40, 16, KEY)))
    assert [pool.ref_count(PageId(p)) for p in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert pool.num_free_pages == 5 and pool.free_page_ids() == (3, 4, 5, 6, 7)
    assert pool.hit_stats() == (0, 3)
    assert pool.cached_page(a.hashes[0]) == 0 and pool.cached_page(a.hashes[1]) == 1
    pool.check_invariants()


def test_identical_prefix_shares_full_pages_but_not_partial():
    pool = PagePool(8)
    pool.allocate(A40, KEY)
    b = pool.allocate(A40, KEY)
    assert b.pages == (0, 1, 3)
    assert b.num_cached_tokens == 32
    assert [pool.ref_count(PageId(p)) for p in range(4)] == [2, 2, 1, 1]
    assert pool.hit_stats() == (2, 4)
    pool.check_invariants()


def test_model_key_separates_caches():
    pool = PagePool(8)
    pool.allocate(A40, KEY)
    other = pool.allocate(A40, "another-model")
    assert other.pages == (3, 4, 5) and other.num_cached_tokens == 0
    assert pool.hit_stats() == (0, 6)
    pool.check_invariants()


def test_prefix_sharing_only_first_page_hits_once():
    pool = PagePool(8)
    pool.allocate(A40, KEY)
    b = pool.allocate(A40[:16] + [7] * 24, KEY)
    assert b.pages == (0, 3, 4) and b.num_cached_tokens == 16
    assert pool.ref_count(PageId(0)) == 2 and pool.ref_count(PageId(1)) == 1
    pool.check_invariants()


def test_freed_hashed_pages_are_reused_not_recomputed():
    pool = PagePool(8)
    a = pool.allocate(A40, KEY)
    pool.free(a)
    # tail of the prefix first, so the tail is evicted before the head
    assert pool.free_page_ids() == (3, 4, 5, 6, 7, 2, 1, 0)
    assert pool.num_free_pages == 8
    assert pool.cached_page(a.hashes[0]) == 0 and pool.cached_page(a.hashes[1]) == 1
    again = pool.allocate(A40, KEY)
    assert again.pages == (0, 1, 3) and again.num_cached_tokens == 32
    assert pool.free_page_ids() == (4, 5, 6, 7, 2)
    assert pool.hit_stats() == (2, 4)
    pool.check_invariants()


def test_exact_page_multiple_is_fully_cached():
    pool = PagePool(4, page_size=4)
    a = pool.allocate(list(range(8)), KEY)
    b = pool.allocate(list(range(8)), KEY)
    assert b.pages == a.pages == (0, 1) and b.num_cached_tokens == 8 == b.num_tokens
    assert pool.num_free_pages == 2


def test_eviction_takes_lru_hashed_page_and_none_leaves_pool_untouched():
    pool = PagePool(4, page_size=4)
    a = pool.allocate(list(range(8)), KEY)
    assert a.pages == (0, 1)
    pool.free(a)
    assert pool.free_page_ids() == (2, 3, 1, 0)
    b = pool.allocate(list(range(100, 112)), KEY)
    assert b.pages == (2, 3, 1)  # page 1 (tail of a) is the LRU hashed page
    assert pool.cached_page(a.hashes[1]) is None  # evicted
    assert pool.cached_page(a.hashes[0]) == 0  # head survives
    pool.check_invariants()

    # a would hit page 0 (free) and need 1 fresh page: none left besides page 0
    before = snapshot(pool, a.hashes + b.hashes)
    assert pool.allocate(list(range(8)), KEY) is None
    assert pool.allocate(list(range(200, 204)), KEY) is not None  # ...while 1 page still fits
    pool.check_invariants()
    # that fit took page 0, evicting the head of a as well
    assert pool.cached_page(a.hashes[0]) is None
    assert snapshot(pool, a.hashes + b.hashes) != before


def test_no_fit_returns_none_and_pool_is_unchanged():
    pool = PagePool(4, page_size=4)
    a = pool.allocate(list(range(8)), KEY)
    pool.free(a)
    b = pool.allocate(list(range(100, 112)), KEY)
    hashes = a.hashes + b.hashes
    before = snapshot(pool, hashes)
    assert pool.allocate(list(range(8)), KEY) is None  # free hit on page 0 + 1 fresh > 1 free
    assert pool.allocate(list(range(300, 309)), KEY) is None  # 3 fresh > 1 free
    assert snapshot(pool, hashes) == before  # no LRU reordering, no hit stats, no evictions
    pool.check_invariants()
    # live hits do not consume free pages: 3 shared + 1 fresh fits in 1 free page
    c = pool.allocate(list(range(100, 116)), KEY)
    assert c is not None and c.pages == (2, 3, 1, 0) and c.num_cached_tokens == 12
    assert pool.cached_page(a.hashes[0]) is None  # page 0 got evicted for c
    pool.free(b)
    pool.free(c)
    d = pool.allocate(list(range(8)), KEY)  # a's pages are gone: recomputed, no hits
    assert d.num_cached_tokens == 0
    pool.check_invariants()


def test_refused_allocate_does_not_touch_lru_of_its_hits():
    pool = PagePool(5, page_size=4)
    a = pool.allocate(list(range(8)), KEY)
    b = pool.allocate(list(range(100, 104)), KEY)
    pool.free(a)
    pool.free(b)
    assert pool.free_page_ids() == (3, 4, 1, 0, 2)
    before = snapshot(pool, a.hashes + b.hashes)
    assert pool.allocate(list(range(4)) + [9] * 20, KEY) is None  # hit on page 0 + 5 fresh > 4
    assert snapshot(pool, a.hashes + b.hashes) == before


def test_double_free_raises():
    pool = PagePool(8)
    a = pool.allocate(A40, KEY)
    pool.free(a)
    with pytest.raises(ValueError, match="double free"):
        pool.free(a)
    pool.check_invariants()
    # a stale handle must not release pages now owned by someone else
    b = pool.allocate(A40, KEY)
    with pytest.raises(ValueError, match="PagePool.free"):
        pool.free(a)
    assert [pool.ref_count(p) for p in b.pages] == [1, 1, 1]
    with pytest.raises(ValueError):
        pool.free(PagePool(8).allocate(A40, KEY))  # foreign handle, same page ids
    pool.check_invariants()


def test_identical_handles_free_independently():
    pool = PagePool(4, page_size=4)
    pool.allocate(list(range(8)), KEY)
    b = pool.allocate(list(range(8)), KEY)
    c = pool.allocate(list(range(8)), KEY)
    assert b == c
    pool.free(b)
    pool.free(c)
    assert pool.ref_count(PageId(0)) == 1
    with pytest.raises(ValueError):
        pool.free(c)


def test_hash_collision_never_registers_a_second_page(monkeypatch):
    # A parent-blind hash makes page 2 of [z, y] collide with page 2 of [x, y].
    monkeypatch.setattr(pages_mod, "hash_page", lambda parent, toks, key: PageHash(hash(tuple(toks)) & 0xFFFF))
    pool = PagePool(6, page_size=2)
    x, y, z, w = [1, 1], [2, 2], [3, 3], [4, 4]
    a = pool.allocate(x + y, KEY)
    b = pool.allocate(z + y, KEY)
    assert b.num_cached_tokens == 0 and b.pages == (2, 3)
    assert pool.cached_page(a.hashes[1]) == 1  # still a's live page, page 3 not registered
    pool.check_invariants()
    pool.free(a)  # page 1 (owner of y) is now free; a live page takes the entry over
    c = pool.allocate(w + y, KEY)
    assert c.pages == (4, 5)
    assert pool.cached_page(c.hashes[1]) == 5
    pool.check_invariants()


# ---------------------------------------------------------------- stateful model

PAGE = 4
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]
token_lists = st.builds(
    lambda stem, k, tail: STEMS[stem][:k] + tail,
    st.integers(0, len(STEMS) - 1),
    st.integers(0, 8),
    st.lists(st.integers(0, 2), max_size=10),
)
keys = st.sampled_from(["m1", "m2"])


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(8, page_size=PAGE)
        self.live: list[tuple[PrefixPages | RowPages, str | None]] = []  # key None: a row's pages
        self.history: list[tuple[list[int], str, int | None, int]] = []
        self.content: dict[int, PageHash] = {}  # what each page's K/V was written for
        self.seen: set[PageHash] = set()

    def _allocate(self, tokens: list[int], key: str, block: int | None = None, extra: int = 0) -> None:
        pool = self.pool
        hashes = chained(tokens, PAGE, key, block)
        needed = -(-(len(tokens) + extra) // PAGE)
        # pages in use by a live allocation are always reusable
        must_hit = 0
        for other, okey in self.live:
            if okey == key:
                n = 0
                while n < min(len(hashes), len(other.hashes)) and hashes[n] == other.hashes[n]:
                    n += 1
                must_hit = max(must_hit, n)
        refs_before = [pool.ref_count(PageId(p)) for p in range(pool.num_pages)]
        before = snapshot(pool, sorted(self.seen))
        res = pool.allocate(tokens, key, len(tokens) + extra, block)
        self.history.append((tokens, key, block, extra))
        if res is None:
            assert snapshot(pool, sorted(self.seen)) == before
            assert needed - must_hit > before[3], "allocate refused a request that fits"
            return
        hits = res.num_cached_tokens // PAGE
        assert res.num_tokens == len(tokens) + extra and len(res.pages) == needed
        assert list(res.hashes) == hashes and res.num_cached_tokens % PAGE == 0
        assert hits >= must_hit
        for i, p in enumerate(res.pages[:hits]):
            assert self.content.get(p) == hashes[i], f"hit on page {p} serves the wrong K/V"
        fresh = res.pages[hits:]
        assert len(set(res.pages)) == len(res.pages)
        assert all(refs_before[p] == 0 for p in fresh)
        free_hits = sum(1 for p in res.pages[:hits] if refs_before[p] == 0)
        assert pool.num_free_pages == before[3] - len(fresh) - free_hits
        h0, m0 = before[2]
        assert pool.hit_stats() == (h0 + hits, m0 + len(fresh))
        for i, p in enumerate(res.pages):
            if i >= hits:
                if i < len(hashes):
                    self.content[p] = hashes[i]
                else:
                    self.content.pop(p, None)
        self.seen.update(hashes)
        self.live.append((res, key))

    @rule(tokens=token_lists, key=keys)
    def allocate(self, tokens, key):
        self._allocate(tokens, key)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def reallocate(self, data):
        self._allocate(*data.draw(st.sampled_from(self.history)))

    @rule(tokens=token_lists, key=keys, blocks=st.sampled_from([1, 2, 3]), extra=st.integers(0, 9))
    def block_row(self, tokens, key, blocks, extra):
        """A block-causal row: its complete prompt blocks keyed block by block (a page's key
        runs to the end of its block), then private pages for the rest of the row."""
        block = {1: PAGE // 2, 2: 2 * PAGE, 3: 3 * PAGE // 2}[blocks]  # half a page, two pages, a page and a half
        self._allocate(tokens[:len(tokens) // block * block], key, block, extra)

    @rule(n=st.integers(13, 32), base=st.integers(10, 13))
    def pressure(self, n, base):
        self._allocate([base] * n, "m1")

    @rule(n=st.integers(1, 20))
    def row(self, n):
        """A block-cache row's private pages: taken from the free ones (evicting what they
        cached), its own K/V written over them."""
        refs_before = [self.pool.ref_count(PageId(p)) for p in range(self.pool.num_pages)]
        free_before, needed = self.pool.num_free_pages, -(-n // PAGE)
        res = self.pool.allocate_row(n)
        if res is None:
            assert needed > free_before and self.pool.num_free_pages == free_before
            return
        assert len(res.pages) == needed == len(set(res.pages)) and res.num_tokens == n
        assert all(refs_before[p] == 0 for p in res.pages)
        assert self.pool.num_free_pages == free_before - needed
        for p in res.pages:
            self.content.pop(p, None)
        self.live.append((res, None))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.live) - 1))
        prefix, _ = self.live.pop(i)
        self.pool.free(prefix)

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        uses = Counter(p for prefix, _ in self.live for p in prefix.pages)
        for p in range(self.pool.num_pages):
            assert self.pool.ref_count(PageId(p)) == uses[p]
        assert self.pool.num_free_pages == sum(1 for p in range(self.pool.num_pages) if uses[p] == 0)


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_pool_state_machine = PoolMachine.TestCase


# ------------------------------------------------------------------ row pages (block cache)


def test_row_pages_are_private_taken_lru_first_and_freed_to_the_front():
    pool = PagePool(num_pages=6, page_size=4)
    prefix = pool.allocate(list(range(8)), "m")  # pages 0, 1: hashed
    pool.free(prefix)  # free again, still cached: free list 2 3 4 5 1 0
    row = pool.allocate_row(9)  # 3 pages, least recently used first
    assert isinstance(row, RowPages) and row.pages == (2, 3, 4) and row.num_tokens == 9
    pool.check_invariants()
    assert pool.allocate_row(13) is None  # 4 pages > 3 free: untouched
    assert pool.num_free_pages == 3
    again = pool.allocate(list(range(8)), "m")  # the prefix's cached pages survived the row
    assert again.num_cached_tokens == 8
    other = pool.allocate_row(4)  # takes page 5, the only free one
    assert other.pages == (5,)
    pool.check_invariants()
    pool.free(row)  # a row's pages hold nothing reusable: next to be taken
    assert pool.free_page_ids()[:3] == (2, 3, 4)
    with pytest.raises(ValueError, match="RowPages that is not live"):
        pool.free(row)
    pool.free(other)
    pool.free(again)
    pool.check_invariants()
    assert pool.num_free_pages == 6


def test_row_page_evicts_a_free_cached_prefix_page_when_it_must():
    pool = PagePool(num_pages=2, page_size=4)
    pool.free(pool.allocate(list(range(8)), "m"))
    row = pool.allocate_row(5)
    pool.check_invariants()
    assert pool.allocate(list(range(8)), "m") is None  # both pages taken by the row
    pool.free(row)
    fresh = pool.allocate(list(range(8)), "m")
    assert fresh.num_cached_tokens == 0  # the row overwrote them: no stale hit
    pool.check_invariants()


# ------------------------------------------------------------------ block-causal rows (pages keyed to their block's end)


def test_block_keyed_rows_share_a_system_prompt_page_by_page():
    """Block-causal rows (page 4, block 8): a page's key runs to the end of its block, so two
    prompts that share a leading system prompt share its pages and nothing after; a prompt
    that shares only the first page of a block shares nothing; a row's pages past its
    complete prompt blocks are private; freed pages stay reusable until evicted."""
    pool = PagePool(num_pages=16, page_size=4)
    system, a, b = [7] * 8, list(range(20, 28)), list(range(40, 48))
    A = pool.allocate(system + a, KEY, num_tokens=28, block=8)  # 16 prompt tokens in 2 blocks, 12 more
    assert A.pages == (0, 1, 2, 3, 4, 5, 6) and A.num_cached_tokens == 0
    assert list(A.hashes) == chained(system + a, 4, KEY, block=8)
    B = pool.allocate(system + b, KEY, num_tokens=28, block=8)
    assert B.pages == (0, 1, 7, 8, 9, 10, 11) and B.num_cached_tokens == 8
    assert [pool.ref_count(PageId(p)) for p in range(12)] == [2, 2] + [1] * 10
    assert pool.hit_stats() == (2, 12)
    C = pool.allocate(system[:4] + a[:4], KEY, num_tokens=8, block=8)  # the same first page, another block
    assert C.pages == (12, 13) and C.num_cached_tokens == 0
    pool.check_invariants()
    for alloc in (A, B, C):
        pool.free(alloc)
    again = pool.allocate(system + a, KEY, num_tokens=20, block=8)
    assert again.num_cached_tokens == 16 and again.pages[:4] == (0, 1, 2, 3)
    assert pool.hit_stats() == (6, 15)
    pool.check_invariants()


def test_block_keyed_allocation_needs_whole_blocks():
    with pytest.raises(ValueError, match="not whole blocks of 8"):
        PagePool(num_pages=4, page_size=4).allocate([1] * 12, KEY, block=8)
