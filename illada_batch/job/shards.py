"""Input listing and shard reading: Parquet over any fsspec URL, footers only for listing;
JSON Lines and CSV files (parsed whole: they have no footer) through ``formats``.

A shard is the unit of work, retry and commit: a row range of one input file, cut on
``shard_rows`` boundaries. Its id comes from the file's path relative to the input root
and its first row, so it is stable across runs as long as the input is unchanged.

Duplicate ids across shards: :func:`mark_duplicate_ids` reads the id column of every
file (ids compare by their text, ``ids.py``, so ``3`` and ``"3"`` are one) and gives each
shard the rows whose id another row already holds: first the rows of shards already
committed in the output (whatever their place in the listing), then the others in input
order. That row becomes an error row wherever it lands, and an (id, sample) key is
generated once however the input is sharded and whatever files are added later.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from illada_batch.errors import InputError, StorageUnavailable
from illada_batch.job.formats import KINDS, is_text, kind, read_text, read_text_rows
from illada_batch.job.ids import canonical_id
from illada_batch.job.records import RowRange
from illada_batch.job.storage import filesystem, is_transient, storage_errors


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: str
    path: str  # full path inside the filesystem (no protocol)
    row_start: int
    num_rows: int
    file_size: int = 0  # the file as planned: a manifest made from another version of it is not trusted
    file_version: str | None = None  # S3 ETag, or local mtime
    # rows of this shard whose id an earlier row of the input has: (offset in the shard, where it was first seen)
    duplicates: tuple[tuple[int, str], ...] = ()

    def row_range(self) -> RowRange:
        return RowRange(self.path, self.file_size, self.file_version, self.row_start, self.num_rows)

    def to_dict(self) -> dict:
        """``asdict(self)`` without its deep copies (every field is immutable): the driver sends
        one per shard."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        return cls(**{**d, "duplicates": tuple((int(k), str(w)) for k, w in d.get("duplicates", ()))})


def list_files(url: str, storage_options: dict, note: Callable[[str], None] = lambda _: None,
               exclude: str | None = None) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """(filesystem, root, files): the input's files; a directory's files that are not prompt
    files by their name are skipped, and ``note`` says which; files under the folder
    ``exclude`` (the job's own output, when it lies inside its input) are never listed."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(f"input.url {url}"):
        if any(ch in path for ch in "*?["):
            files, root = sorted(fs.glob(path)), path.split("*")[0].rsplit("/", 1)[0]
        elif fs.isdir(path):
            listed = [f for f in sorted(fs.find(path)) if not _under(f, exclude)]
            files, root = [f for f in listed if kind(f)], path
            skipped = [_relative(f, root) for f in listed if not kind(f)]
            if skipped:
                shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                note(f"input.url {url}: skipped {len(skipped)} file(s) that are not prompt files by their name "
                     f"({', '.join(KINDS)}, optionally .gz, .bz2 or .xz): {shown}")
        elif fs.exists(path):
            files, root = [path], path.rsplit("/", 1)[0]
        else:
            raise InputError(f"input.url {url}: no such file or directory")
    files = [f for f in files if not _under(f, exclude)]
    if not files:
        raise InputError(f"input.url {url}: no Parquet, JSON Lines or CSV files found")
    return fs, root, files


def _under(path: str, folder: str | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder.rstrip("/") + "/"))


def plan_shards(url: str, storage_options: dict, shard_rows: int, columns: list[str],
                id_column: str | None = None, prompt_column: str | None = None,
                note: Callable[[str], None] = lambda _: None, exclude: str | None = None,
                ) -> tuple[list[Shard], list[tuple[str, str]]]:
    """Shards of every readable input file, from Parquet footers only (text files are parsed);
    and (file, error) for the rest. ``note`` hears of skipped files and files without rows.
    ``id_column`` must hold strings or integers (see :func:`mark_duplicate_ids` for repeats);
    ``prompt_column`` text (a column of numbers would fail every row of its file). A text
    file's column of mixed types (JSON Lines) passes when one of its types does: each odd
    value becomes an error row. Files under ``exclude`` (the output) are not input."""
    fs, root, files = list_files(url, storage_options, note, exclude)
    shards, bad = [], []
    for path in files:
        try:
            size, version = file_version(fs, path)
            if is_text(path):
                table = read_text(fs, path)
                rows, schema = table.num_rows, table.schema
            else:
                with fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f)
                    rows, schema = meta.metadata.num_rows, meta.schema_arrow
        except InputError as exc:  # a text file's bad line, named
            bad.append((path, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, unreadable
            if is_transient(exc):  # the store, not the file: stop before any work rather than fail the file
                raise StorageUnavailable(f"{path}: cannot read the footer ({type(exc).__name__}: {exc}); "
                                         f"nothing was started") from None
            bad.append((path, f"{path}: not a readable {kind(path) or 'Parquet'} file ({type(exc).__name__}: {exc})"))
            continue
        if rows == 0:  # an empty file, a header only: nothing to generate, not a failure a re-run "retries"
            note(f"{path}: no rows, nothing to generate")
            continue
        missing = [c for c in columns if c not in schema.names]
        if missing:
            bad.append((path, f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})"))
            continue
        repeated = [c for c in columns if len(schema.get_all_field_indices(c)) > 1]
        if repeated:
            bad.append((path, f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once in the "
                              f"header (has {', '.join(schema.names)})"))
            continue
        if id_column is not None and not _scalar_id(schema.field(id_column).type):
            bad.append((path, f"{path}: column {id_column!r} (the row id) is {schema.field(id_column).type}; "
                              f"expected strings or integers"))
            continue
        if prompt_column is not None and not _text_like(schema.field(prompt_column).type):
            bad.append((path, f"{path}: column {prompt_column!r} (the prompt) is {schema.field(prompt_column).type}; "
                              f"expected strings"))
            continue
        tag = hashlib.sha1(_relative(path, root).encode()).hexdigest()[:8]
        for start in range(0, rows, shard_rows):
            shards.append(Shard(f"{tag}-{start:09d}", path, start, min(shard_rows, rows - start), size, version))
    return shards, bad


def file_version(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str | None]:
    """(size, version) of a file: the version is its ETag where the store has one (S3), else its mtime."""
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return int(info.get("size") or 0), None if version is None else str(version).strip('"')


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def _text_like(t: pa.DataType) -> bool:
    """Strings, bytes (decoded per row) or all nulls (each row an error of its own); or a
    union with one of them (a text file's mixed column: the other values are error rows)."""
    if pa.types.is_union(t):
        return any(_text_like(f.type) for f in t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or \
        pa.types.is_large_binary(t) or pa.types.is_null(t)


def _scalar_id(t: pa.DataType) -> bool:
    """Integers or text (``ids.canonical_id`` reads them per row), or a union with one of them."""
    if pa.types.is_union(t):
        return any(_scalar_id(f.type) for f in t)
    return pa.types.is_integer(t) or _text_like(t)


def mark_duplicate_ids(url: str, storage_options: dict, shards: list[Shard], id_column: str,
                       threads: int = 8, committed: dict | None = None) -> tuple[list[Shard], list[tuple[str, str]]]:
    """``shards`` (from :func:`plan_shards` on ``url``) with each row whose id another row
    holds first listed in its shard's ``duplicates``; and (file, error) for files whose id
    column cannot be read (their shards are dropped). Ids are held first by the rows of the
    ``committed`` shards ({shard id: Manifest}; the rows a manifest lists in
    ``duplicate_rows`` hold nothing), then by the other rows, files in listing order, rows
    in file order. Null ids are left to the row check. Reads one column of every file: the
    driver's only full pass."""
    committed = committed or {}
    fs, _ = filesystem(url, storage_options)
    by_file: dict[str, list[Shard]] = {}
    for s in shards:
        by_file.setdefault(s.path, []).append(s)
    root = posixpath.dirname(next(iter(by_file))) if len(by_file) == 1 else posixpath.commonpath(list(by_file))

    def read_ids(path: str):
        try:
            if is_text(path):
                ids = read_text(fs, path).column(id_column).to_pylist()
            else:
                with fs.open(path, "rb") as f:
                    ids = pq.read_table(f, columns=[id_column]).column(0).to_pylist()
            return [canonical_id(v, id_column)[0] for v in ids]
        except Exception as exc:  # noqa: BLE001 - corrupt data pages behind a good footer
            error = StorageUnavailable if is_transient(exc) else InputError
            return error(f"{path}: cannot read column {id_column!r} ({type(exc).__name__}: {exc})")

    with ThreadPoolExecutor(max(1, min(threads, len(by_file)))) as pool:
        columns = list(pool.map(read_ids, by_file))
    first: dict = {}  # id -> (shard id, "row R of FILE")
    for (path, file_shards), ids in zip(by_file.items(), columns):
        if isinstance(ids, Exception):
            continue
        for s in (s for s in file_shards if s.shard_id in committed):  # committed ids win
            skip = set(committed[s.shard_id].duplicate_rows)
            for k, row_id in enumerate(ids[s.row_start:s.row_start + s.num_rows]):
                if row_id is not None and k not in skip and row_id not in first:
                    first[row_id] = (s.shard_id, f"row {s.row_start + k} of {_relative(path, root)}, "
                                                 f"already in the output in shard {s.shard_id}")
    out, bad = [], []
    for (path, file_shards), ids in zip(by_file.items(), columns):
        if isinstance(ids, StorageUnavailable):
            raise StorageUnavailable(f"{ids}; nothing was started")
        if isinstance(ids, InputError):
            bad.append((path, str(ids)))
            continue
        name = _relative(path, root)
        for s in file_shards:
            if s.shard_id in committed:  # not generated again: its rows hold their ids already
                out.append(s)
                continue
            dups = []
            for k, row_id in enumerate(ids[s.row_start:s.row_start + s.num_rows]):
                if row_id is None:
                    continue
                seen = first.get(row_id)
                if seen is None:
                    first[row_id] = (s.shard_id, f"row {s.row_start + k} of {name}")
                elif seen[0] != s.shard_id:  # repeats inside one shard: the row check reports them
                    dups.append((k, seen[1]))
            out.append(replace(s, duplicates=tuple(dups)) if dups else s)
    return out, bad


def read_shard(fs: fsspec.AbstractFileSystem, shard: Shard, columns: list[str]) -> pa.Table:
    """The shard's rows (only ``columns``), reading just the row groups that hold them."""
    try:
        if is_text(shard.path):
            return read_text_rows(fs, shard.path, columns, shard.row_start, shard.num_rows)
        with fs.open(shard.path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(f"{shard.path}: missing column(s) {', '.join(missing)}")
            groups, first, seen = [], None, 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if seen + n > shard.row_start and seen < shard.row_start + shard.num_rows:
                    groups.append(i)
                    first = seen if first is None else first
                seen += n
            table = pf.read_row_groups(groups, columns=columns)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        error = StorageUnavailable if is_transient(exc) else InputError
        raise error(f"{shard.path}: cannot read rows {shard.row_start}-{shard.row_start + shard.num_rows} "
                    f"({type(exc).__name__}: {exc})") from None
    return table.slice(shard.row_start - first, shard.num_rows)
