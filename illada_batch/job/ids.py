"""A row's identity: the canonical text of its id.

An id is an integer or a string in the input (Parquet and JSON Lines have both; CSV only
text, as written), and the same id may be spelt both ways in two files: ``3`` in a JSON
Lines file and ``"3"`` in a CSV. Its identity is its text (``str`` of an integer, a string
as it is, UTF-8 bytes decoded), one for every file and format: the duplicate-id pass
compares it, the sample's seed is drawn from it (``sample_seed(seed, id text, sample)``),
and the output's ``id`` column holds it, a string in every output file whatever the input's
types (so one output's files share one schema). ``"007"`` and ``7`` stay two ids: text is
never read as a number.
"""

from __future__ import annotations

from typing import NewType

RowId = NewType("RowId", str)


def canonical_id(value: object, column: str) -> tuple[RowId | None, str | None]:
    """(the id's text, None), or (None, why the row has no id, naming ``column``)."""
    value, error = decoded(value, column)
    if error is not None:
        return None, error
    if isinstance(value, str):
        return RowId(value), None
    if isinstance(value, int) and not isinstance(value, bool):
        return RowId(str(value)), None
    return None, f"{column} is {type(value).__name__}, expected a string or an integer"


def decoded(value: object, column: str) -> tuple[object, str | None]:
    """(value, None) with UTF-8 bytes as text, or (None, why: null or not UTF-8, naming
    ``column``): the first check of every value a row gives (its id, prompt, variables)."""
    if value is None:
        return None, f"{column} is null"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, f"{column} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    return value, None
