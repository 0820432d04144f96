"""Prompt files that are not Parquet: JSON Lines (``.jsonl``, ``.json``: one object per line)
and CSV (``.csv``, a header row), read with pyarrow's own readers.

A text file has no footer: its row count and columns are known only by parsing it, so
planning parses each text file (Parquet: the footer only), and a shard of a text file is a
row range of the parsed table. Parsed files stay in a small per-process cache (at most
``CACHE_BYTES`` of Arrow data, least recently used out first), so the planner's two passes
(rows and columns, then the id column) and a replica's consecutive shards of one file parse
it once; a file larger than the cache is parsed again for each shard (see README, "JSONL
and CSV prompts").

Checks, as for Parquet: a line that does not parse fails its file with the line number
(``data.jsonl: line 7: not valid JSON (...)``); a missing column is named by the planner;
a value of the wrong type stays a value and becomes an error row where it is used. pyarrow's
JSON reader refuses a column whose type changes between lines (a prompt that is a number on
one line), so such a file is read again line by line with Python's ``json`` and the column
becomes an Arrow union of its types: ``render_rows`` then writes "prompt is int, expected a
string" for that row. CSV has no types: every column is read as text, exactly as written
(an id ``007`` stays ``"007"``); an empty field is null.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import OrderedDict

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from illada_batch.errors import InputError

KINDS = {".parquet": "Parquet", ".jsonl": "JSON Lines", ".json": "JSON Lines", ".csv": "CSV"}
CACHE_BYTES = 256 << 20  # parsed text files kept per process (driver or replica)


def kind(path: str) -> str | None:
    """``Parquet``, ``JSON Lines``, ``CSV`` by the name's suffix, or None. A directory's
    listing keeps the files with a kind; a file named by a glob or by itself without one is
    read as Parquet, as before text files were read."""
    for suffix, name in KINDS.items():
        if path.lower().endswith(suffix):
            return name
    return None


def is_text(path: str) -> bool:
    return kind(path) in ("JSON Lines", "CSV")


def read_text_rows(fs: fsspec.AbstractFileSystem, path: str, columns: list[str], start: int, num: int) -> pa.Table:
    """Rows ``start .. start + num - 1`` of a text file, only ``columns``."""
    table = read_text(fs, path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table.select(columns).slice(start, num)


def read_text(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """Every row and column of a JSON Lines or CSV file (cached; see the module note).
    Raises InputError naming the file (and the line) when it does not parse; storage errors
    propagate for the caller to tell transient from bad."""
    info = fs.info(path)
    key = (path, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    with fs.open(path, "rb") as f:
        data = f.read()
    table = _parse_jsonl(path, data) if kind(path) == "JSON Lines" else _parse_csv(path, data)
    with _lock:
        _cache[key] = table
        while len(_cache) > 1 and sum(t.nbytes for t in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return table


_cache: OrderedDict[tuple, pa.Table] = OrderedDict()
_lock = threading.Lock()


def _parse_jsonl(path: str, data: bytes) -> pa.Table:
    try:
        return pjson.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        arrow_error = str(exc)
    # pyarrow's row numbers count from the start of its parse block, not the file: find the
    # line with Python, then either name it or (only types changed) build the table here
    records = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}: line {lineno}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {lineno}: not a JSON object (a JSON Lines file holds one "
                             f"object per line), got {type(obj).__name__}")
        records.append(obj)
    if "changed from" not in arrow_error:
        raise InputError(f"{path}: not a readable JSON Lines file ({arrow_error})")
    names = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({k: _column([r.get(k) for r in records]) for k in names})


def _column(values: list) -> pa.Array:
    """An Arrow array of ``values``; a column whose values have several types becomes a
    dense union of one child per type, so each value keeps its own type."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        pass
    kinds = list(dict.fromkeys(type(v).__name__ for v in values if v is not None))
    children: dict[str, list] = {k: [] for k in kinds}
    codes, offsets = [], []
    for v in values:
        k = kinds[0] if v is None else type(v).__name__
        codes.append(kinds.index(k))
        offsets.append(len(children[k]))
        children[k].append(v)
    return pa.UnionArray.from_dense(pa.array(codes, pa.int8()), pa.array(offsets, pa.int32()),
                                    [pa.array(children[k]) for k in kinds], kinds)


def _parse_csv(path: str, data: bytes) -> pa.Table:
    header = next(csv.reader(io.StringIO(data[:1 << 20].decode("utf-8", errors="replace"))), [])
    try:
        return pcsv.read_csv(
            pa.BufferReader(data),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),  # prompts are often several lines
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                strings_can_be_null=True, quoted_strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: {_bad_csv_line(data, len(header)) or 'not a readable CSV file'} ({exc})") from None


def _bad_csv_line(data: bytes, width: int) -> str | None:
    """``line N: ...`` for the first record whose field count differs from the header's."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))
    for record in reader:
        if record and len(record) != width:
            return f"line {reader.line_num}: {len(record)} fields, the header has {width}"
    return None
