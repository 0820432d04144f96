"""Which tokens each row of the block-causal cache runs in an iteration (``block_causal``):
chunked prefill, and rows waiting for pages another row is still writing. Pure Python.

A row's queries run from ``cached`` (its leading tokens whose final K/V are in its pages) to
the end of its current block. Two things can hold a row back in an iteration:

- The prefill budget (``chunk``): over all rows, at most ``chunk`` prompt tokens (rounded
  down to whole blocks, at least one block) run per iteration. A row whose uncached complete
  prompt blocks fit what is left runs them and its current block: it decodes. Otherwise it
  runs as many whole blocks as fit and does not decode this iteration: no token is chosen and
  no step is counted, so its sampler steps (and tokens) are the ones it has without chunking.
  The first row with prefill left always gets at least one block, so every prompt finishes;
  rows decoding (no prompt blocks left) are never charged, so a long prompt joining does not
  stall them. ``chunk=None``: no budget (a row's whole prefill rides in its first forward).
- Pages not written yet: the pool registers a row's fresh prompt pages when it joins
  (``PagePool.allocate``), so a row joining later may hit pages whose writer has not reached
  them (its prefill is chunked). It runs nothing until they are written, then starts after
  them: a shared system prompt is prefilled once, chunk by chunk, while the rows sharing it
  wait. Rows are planned in batch order, the order they joined, and a forward writes every
  query's K/V before any attention reads them, so a row may also run in the forward that
  writes the pages it waits for; it waits only on rows that joined before it.

Invariants (``check``): ``unwritten`` holds only pages of live rows; the unwritten pages before
a row's ``cached`` are pages it waits for.
"""

from __future__ import annotations

from dataclasses import dataclass

from illada_batch.engine.pages import PageId, PrefixPages


@dataclass(frozen=True)
class Span:
    """A row's queries in one iteration: tokens [start, stop) of the row; ``decodes``: they
    end with its current block, whose logits the sampler reads (else prefill only)."""

    start: int
    stop: int
    decodes: bool


class PrefillSchedule:
    def __init__(self, block: int, page_size: int, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
        self.block, self.page_size = block, page_size
        self.chunk = None if chunk is None else max(block, chunk // block * block)  # whole blocks, at least one
        self.cached: dict[int, int] = {}  # row -> leading tokens whose final K/V are in its pages
        self.tables: dict[int, tuple[PageId, ...]] = {}  # row -> its pages, token order
        self.unwritten: set[PageId] = set()  # prompt pages registered in the pool that no forward has written yet
        self.waits_for: dict[int, set[PageId]] = {}  # row -> unwritten pages it hit in the pool

    def join(self, row: int, pages: PrefixPages) -> None:
        """Row ``row`` took ``pages`` (its complete prompt blocks hashed, the first
        ``num_cached_tokens`` hit in the pool)."""
        hit = pages.num_cached_tokens // self.page_size
        self.cached[row], self.tables[row] = pages.num_cached_tokens, pages.pages
        self.waits_for[row] = self.unwritten.intersection(pages.pages[:hit])
        self.unwritten.update(pages.pages[hit:len(pages.hashes)])  # its fresh prompt pages: it writes them

    def leave(self, row: int) -> None:
        assert not self.waits_for[row], f"row {row} finished waiting for pages {sorted(self.waits_for[row])}"
        for d in (self.cached, self.tables, self.waits_for):
            del d[row]

    def plan(self, rows: list[tuple[int, int, int]]) -> list[Span]:
        """One iteration. ``rows``: (row, prompt_end, end) in batch order: the token index where
        its complete prompt blocks end (its decoding window starts) and where its current block
        ends. Moves each row's ``cached`` past what its span writes."""
        left, spans = self.chunk, []
        for row, prompt_end, end in rows:
            start = self.cached[row]
            waits = self.waits_for[row]
            waits &= self.unwritten  # those written by earlier forwards or by rows before it in this one
            prefill = max(0, prompt_end - start)
            if waits:
                span = Span(start, start, False)
            elif left is None or prefill <= left:
                span = Span(start, end, True)
                left = None if left is None else left - prefill
            else:  # as many whole blocks as the budget has left (none once it is under a block)
                stop = max(start, (start + left) // self.block * self.block)
                span, left = Span(start, stop, False), left - (stop - start)
            self.unwritten.difference_update(self.tables[row][span.start // self.page_size:span.stop // self.page_size])
            self.cached[row] = end - self.block if span.decodes else span.stop  # everything before its current block is final
            spans.append(span)
        return spans

    def check(self) -> None:
        """The invariants of the module docstring."""
        live = {p for t in self.tables.values() for p in t}
        assert self.unwritten <= live, f"unwritten pages {sorted(self.unwritten - live)} belong to no live row"
        for row, table in self.tables.items():
            early = self.unwritten.intersection(table[:self.cached[row] // self.page_size]) - self.waits_for[row]
            assert not early, f"row {row} counts unwritten pages {sorted(early)} as cached"
