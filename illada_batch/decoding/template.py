"""Response templates: fixed text with masked slots, which only a masked-diffusion model can
fill in place (infilling).

A template is text with ``{slot:N}`` markers, N tokens each, and optionally ``{column}``
markers filled from the row (the job's ``prompt`` and ``input.variables``), e.g.
``'{"name": "{slot:8}", "age": {slot:3}}'``. Only those two marker forms are markers; every
other brace is text, so JSON needs no escaping. A row's response is laid out as the
template's tokens (each fixed text piece tokenized on its own, each slot N mask tokens)
followed by EOS up to ``gen_length``; the sampler unmasks slot positions only, so fixed
text never changes and every step sees it, on both sides of each slot.

A slot's text is its tokens up to its first EOS (an EOS inside a slot ends that slot's
text); the response text is the fixed strings, byte for byte, with each slot's text in its
place. Torch-free: the job spec validates templates on the driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from illada_batch.errors import ParamsError

MARKER = re.compile(r"\{(?:slot:(\d+)|([A-Za-z_][A-Za-z0-9_]*))\}")
# what a slot marker written slightly wrong looks like ({slot: 3}, {Slot:3}, {slot:}, {slot:x}, { slot:3 })
NEAR_MISS = re.compile(r"\{\s*slot\s*:[^{}]*\}", re.IGNORECASE)


@dataclass(frozen=True)
class ResponseTemplate:
    """A parsed template: text pieces (str), slot sizes (int) and row columns (``Column``), in order."""

    pieces: tuple

    @classmethod
    def parse(cls, text: str) -> "ResponseTemplate":
        pieces, at = [], 0
        for m in MARKER.finditer(text):
            pieces.append(text[at:m.start()])
            if m.group(1) is not None:
                size = int(m.group(1))
                if size < 1:
                    raise ParamsError(f"{m.group(0)}: a slot holds at least 1 token")
                pieces.append(size)
            else:
                pieces.append(Column(m.group(2)))
            at = m.end()
        pieces.append(text[at:])
        for piece in pieces:
            near = NEAR_MISS.search(piece) if isinstance(piece, str) else None
            if near:
                raise ParamsError(f"{near.group(0)} is not a slot marker: write {{slot:N}} (lowercase, no spaces, "
                                  f"N a number of tokens)")
        if not any(isinstance(p, int) for p in pieces):
            raise ParamsError("no {slot:N} in the template: nothing to generate")
        return cls(tuple(p for p in pieces if p != ""))

    @property
    def slot_sizes(self) -> list[int]:
        return [p for p in self.pieces if isinstance(p, int)]

    @property
    def columns(self) -> list[str]:
        return [p.name for p in self.pieces if isinstance(p, Column)]

    def render(self, values: dict) -> "ResponseTemplate":
        """Row ``values`` in place of the column markers (KeyError for a missing one)."""
        return ResponseTemplate(tuple(str(values[p.name]) if isinstance(p, Column) else p for p in self.pieces))

    def tokenize(self, encode) -> "TokenTemplate":
        """The token layout: ``encode(text) -> ids`` for each fixed text piece."""
        if self.columns:
            raise ValueError(f"render the template's columns first: {', '.join(self.columns)}")
        texts, slots, run = [], [], ""
        for p in self.pieces:
            if isinstance(p, int):
                texts.append(run)
                slots.append(p)
                run = ""
            else:
                run += p
        texts.append(run)
        return TokenTemplate(tuple(texts), tuple(tuple(encode(t)) if t else () for t in texts), tuple(slots))


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class TokenTemplate:
    """A rendered template as tokens: ``fixed[k]`` (text ``texts[k]``) before slot k, the
    last one after the last slot; ``slots[k]`` tokens in slot k."""

    texts: tuple[str, ...]
    fixed: tuple[tuple[int, ...], ...]
    slots: tuple[int, ...]

    @property
    def length(self) -> int:
        return sum(map(len, self.fixed)) + sum(self.slots)

    def layout(self, gen_length: int, mask_id: int, eos_id: int) -> tuple[list[int], list[int]]:
        """The response's first tokens (mask in slots, EOS after the template) and each
        position's slot index (-1 on fixed text and the EOS tail)."""
        ids, slot_of = [], []
        for k, size in enumerate(self.slots):
            ids += list(self.fixed[k]) + [mask_id] * size
            slot_of += [-1] * len(self.fixed[k]) + [k] * size
        ids += list(self.fixed[-1])
        slot_of += [-1] * len(self.fixed[-1])
        tail = gen_length - len(ids)
        return ids + [eos_id] * tail, slot_of + [-1] * tail

    def read(self, response: list[int], eos_id: int, decode) -> tuple[str | None, list | None, list[int], bool]:
        """(text, slot texts, token ids as written, whether a slot ended at an EOS) of a
        decoded ``response`` laid out by :meth:`layout`; ``decode(ids) -> str`` (or None:
        no tokenizer, and then no texts)."""
        laid_out, _ = self.layout(len(response), -1, -1)
        changed = [p for p, t in enumerate(laid_out) if t >= 0 and response[p] != t]
        if changed:  # the loop unmasks masked positions only: this is a bug, not bad input
            raise RuntimeError(f"the decoding loop changed a response template's fixed text at positions {changed}")
        texts, ids, at, stopped = [], list(self.fixed[0]), len(self.fixed[0]), False
        for k, size in enumerate(self.slots):
            slot = response[at:at + size]
            if eos_id in slot:
                slot, stopped = slot[:slot.index(eos_id)], True
            texts.append(decode(slot))
            ids += slot + list(self.fixed[k + 1])
            at += size + len(self.fixed[k + 1])
        if None in texts:
            return None, None, ids, stopped
        text = "".join(t + s for t, s in zip(self.texts, texts)) + self.texts[-1]
        return text, texts, ids, stopped
