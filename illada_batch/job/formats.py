"""Prompt files that are not Parquet: JSON Lines (``.jsonl``, ``.json``: one object per line)
and CSV (``.csv``, a header row), read with pyarrow's own readers; either may be compressed
(``.gz``, ``.bz2``, ``.xz``: read through fsspec's ``compression="infer"``). A leading UTF-8
byte-order mark (Excel's "CSV UTF-8") is dropped; a file of no bytes has no rows.

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
string" for that row. So is a file that is not valid UTF-8 (pyarrow would read it without a
word, and the shard would fail on the first bad string): a string holding invalid bytes
becomes those bytes, and its row an error row ("prompt is not valid UTF-8"), as a Parquet
binary column's. CSV has no types: every column is read as text, exactly as written (an id
``007`` stays ``"007"``, ``NA`` stays ``"NA"``); only an empty field is null; a column with
invalid UTF-8 keeps its bad values as bytes (each an error row where it is used).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import OrderedDict

import fsspec
import fsspec.utils
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from illada_batch.errors import InputError

KINDS = {".parquet": "Parquet", ".jsonl": "JSON Lines", ".json": "JSON Lines", ".csv": "CSV"}
COMPRESSED = (".gz", ".bz2", ".xz")  # text files only: a Parquet file compresses its own pages
CACHE_BYTES = 256 << 20  # parsed text files kept per process (driver or replica)
BOM = b"\xef\xbb\xbf"


def kind(path: str) -> str | None:
    """``Parquet``, ``JSON Lines``, ``CSV`` by the name's suffix (any case; a text file's
    maybe followed by a compression suffix), or None. A directory's listing keeps the files
    with a kind; a file named by a glob or by itself without one is read as Parquet, as before
    text files were read."""
    name = path.lower()
    compressed = name.endswith(COMPRESSED)
    if compressed:
        name = name.rsplit(".", 1)[0]
    for suffix, k in KINDS.items():
        if name.endswith(suffix) and not (compressed and k == "Parquet"):
            return k
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
    with fs.open(path, "rb", compression=fsspec.utils.infer_compression(path)) as f:
        data = f.read()
    data = data[len(BOM):] if data.startswith(BOM) else data
    if not data.strip():
        table = pa.table({})  # no rows: the planner notes it
    else:
        table = _parse_jsonl(path, data) if kind(path) == "JSON Lines" else _parse_csv(path, data)
    with _lock:
        _cache[key] = table
        while len(_cache) > 1 and sum(t.nbytes for t in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return table


_cache: OrderedDict[tuple, pa.Table] = OrderedDict()
_lock = threading.Lock()


def _parse_jsonl(path: str, data: bytes) -> pa.Table:
    if _utf8(data):
        try:
            return pjson.read_json(pa.BufferReader(data))
        except pa.ArrowInvalid:
            pass
    # mixed types or invalid UTF-8 (or a bad line: pyarrow's row numbers count from the start
    # of its parse block, not the file): read line by line, naming a bad line
    records = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except ValueError as exc:
            raise InputError(f"{path}: line {lineno}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {lineno}: not a JSON object (a JSON Lines file holds one "
                             f"object per line), got {type(obj).__name__}")
        records.append({k: _invalid_as_bytes(v) for k, v in obj.items()})
    names = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({k: _column([r.get(k) for r in records]) for k in names})


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _invalid_as_bytes(value):
    """A value whose text holds bytes that were not UTF-8 (decoded as lone surrogates): its
    original bytes, so its row is an error row that says so (a nested value: its JSON's bytes)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogateescape")


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
    """Every column as bytes, then as text where the column is valid UTF-8 (else a union of
    its good strings and its bad bytes). The header is the first record, read by pyarrow with
    the rest, so its names are exactly the file's (a repeated name stays repeated, for the
    planner to name)."""
    header = next(csv.reader(io.StringIO(data[:1 << 20].decode("utf-8", errors="replace"))), [])
    try:
        raw = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(autogenerate_column_names=True),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),  # prompts are often several lines
            convert_options=pcsv.ConvertOptions(column_types={f"f{i}": pa.binary() for i in range(len(header))},
                                                null_values=[""], strings_can_be_null=True,
                                                quoted_strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: {_bad_csv_line(data, len(header)) or 'not a readable CSV file'} ({exc})") from None
    names = [_text(v) for v in raw.slice(0, 1).to_pylist()[0].values()]
    return pa.Table.from_arrays([_text_column(c.combine_chunks()) for c in raw.slice(1).columns], names=names)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


def _text_column(values: pa.Array) -> pa.Array:
    try:
        return pc.cast(values, pa.string())
    except pa.ArrowInvalid:  # invalid UTF-8 somewhere: good values as text, bad ones as bytes
        return _column([v if v is None or not _utf8(v) else v.decode("utf-8") for v in values.to_pylist()])


def _bad_csv_line(data: bytes, width: int) -> str | None:
    """``line N: ...`` for the first record whose field count differs from the header's."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))
    for record in reader:
        if record and len(record) != width:
            return f"line {reader.line_num}: {len(record)} fields, the header has {width}"
    return None
