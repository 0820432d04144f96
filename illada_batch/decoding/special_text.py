"""Special-token text in what should be plain text.

A tokenizer reads the text of its special tokens (``<|mdm_mask|>``, ``<|endoftext|>``,
``<|eot_id|>`` ...) as those tokens wherever it stands in a string. In a prompt or a response
template's fixed text that is a control token, not text: the mask token in fixed text is
generated over (and the loop's check that fixed text never changes fails), an EOS ends the
response early. So fixed text a job spec gives (``template``, ``response_template``, the
prefix) that holds one is refused, and a row whose value holds one becomes an error row
naming the column. Torch-free: the driver side checks specs with it.
"""

from __future__ import annotations

from typing import Iterable


def find_special(text: str, specials: Iterable[str]) -> str | None:
    """The first special token text found in ``text``, or None."""
    return next((s for s in specials if s and s in text), None)


def special_problem(where: str, text: str, specials: Iterable[str]) -> str | None:
    """One line saying that ``where`` holds special token text, or None."""
    found = find_special(text, specials)
    if found is None:
        return None
    return (f"{where} holds {found!r}, the text of a special token of the model's tokenizer (it would be read as "
            f"that token, not as text)")
