"""moto's S3 server with S3's listing complexity, for the scale benchmark.

moto (5.x) answers every page of a listing by walking, copying and sorting the whole bucket
(``S3Backend.list_objects``; ``list_objects_v2`` calls it with no limit, then slices one page),
so listing 10^5 keys a thousand at a time costs a hundred full sorts: a ``status`` at 10^5
shards would time moto, not the job. S3 lists a page in about the time of the page.

``install()`` keeps a sorted index of each bucket's key names (``_SortedKeyStore``, updated on
every put and delete) and answers ``list_objects`` and ``list_objects_v2`` from it by bisection:
a page costs O(page + log n). The answers are moto's own, quirks included (ListObjects v1
returns every common prefix on every page; a folder at or before the start key is left out;
continuation tokens are moto's, in the same table); ``tests/test_moto_listing.py`` holds them
equal to moto's on random key sets. Everything else (PUT, GET, tags, ETags) is moto unchanged.

moto also writes each listed key's ``LastModified`` by parsing its own ISO text back with
dateutil (``parse_to_aware_datetime`` in its serializer, about 0.15 s of a 1000-key page) and
formatting it again. ``install()`` gives that serializer ``job/timestamps.py``'s parser for
S3's form: the same datetime, so the same text (``tests/test_moto_listing.py``).

Applied only in the server process the benchmark starts (``python -m
illada_batch.bench.moto_listing PORT``, see ``bench/pipeline.py`` ``_moto``), never in a client.
"""

from __future__ import annotations

import bisect
import sys
import threading

from moto.core import serialize
from moto.s3.models import FakeBucket, FakeDeleteMarker, FakeKey, S3Backend
from moto.s3.utils import _VersionedKeyStore
from moto.utilities.utils import md5_hash

from illada_batch.job import timestamps

_LOCK = threading.RLock()  # the server is threaded: a page is read while no put or delete moves the index


class _SortedKeyStore(_VersionedKeyStore):
    """moto's key store (name -> versions) with ``names``, its names in sorted order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names: list[str] = sorted(dict.keys(self))

    def _add(self, key: str) -> None:
        i = bisect.bisect_left(self.names, key)
        if i == len(self.names) or self.names[i] != key:
            self.names.insert(i, key)

    def _drop(self, key: str) -> None:
        i = bisect.bisect_left(self.names, key)
        if i < len(self.names) and self.names[i] == key:
            del self.names[i]

    def __setitem__(self, key: str, value) -> None:
        with _LOCK:
            super().__setitem__(key, value)
            self._add(key)

    def setlist(self, key, list_) -> None:
        with _LOCK:
            super().setlist(key, list_)
            self._add(key)

    def pop(self, key: str) -> None:  # type: ignore[override]
        with _LOCK:
            super().pop(key)
            self._drop(key)

    def __delitem__(self, key: str) -> None:
        with _LOCK:
            super().__delitem__(key)
            self._drop(key)


def _after(key: str) -> str | None:
    """The least text above every text that starts with ``key`` (None: there is none)."""
    while key and ord(key[-1]) == sys.maxunicode:
        key = key[:-1]
    return key[:-1] + chr(ord(key[-1]) + 1) if key else None


def _walk(bucket: FakeBucket, prefix: str, delimiter: str, above: str | None, folders: bool = True):
    """moto's listing items (a ``FakeKey`` or a common prefix), in name order, under ``prefix``
    and named after ``above``: a name holding ``delimiter`` after the prefix rolls up into its
    common prefix (one item, however many keys it holds; a prefix not after ``above`` is left
    out); a key whose newest version is a delete marker is not listed (its common prefix is)."""
    store = bucket.keys
    names = store.names
    i = bisect.bisect_left(names, prefix)
    if above is not None:
        i = max(i, bisect.bisect_right(names, above))
    while i < len(names):
        name = names[i]
        if not name.startswith(prefix):
            return
        rest = name[len(prefix):]
        if delimiter and delimiter in rest:
            folder = f"{prefix}{rest.split(delimiter)[0]}{delimiter}"
            if folders and (above is None or folder > above):
                yield folder
            end = _after(folder)
            i = len(names) if end is None else bisect.bisect_left(names, end, i + 1)
            continue
        key = store[name]
        if not isinstance(key, FakeDeleteMarker):
            yield key
        i += 1


def _page(backend: S3Backend, items, max_keys: int | None) -> tuple[list, bool, str | None]:
    """(at most ``max_keys`` items, truncated?, the next token): moto's ``_truncate_result``."""
    if max_keys is None:
        return list(items), False, None
    if max_keys == 0:
        return [], False, None
    page = []
    for item in items:
        if len(page) == max_keys:
            last = page[-1].name if isinstance(page[-1], FakeKey) else page[-1]
            token = md5_hash(last.encode("utf-8")).hexdigest()
            backend._pagination_tokens[token] = last
            return page, True, token
        page.append(item)
    return page, False, None


def list_objects(self: S3Backend, bucket: FakeBucket, prefix: str | None, delimiter: str | None,
                 marker: str | None, max_keys: int | None):
    """ListObjects (v1), as moto answers it: a page of keys after ``marker``, and every common
    prefix under ``prefix`` whatever the page."""
    if not isinstance(bucket.keys, _SortedKeyStore):
        return _MOTO_LIST_OBJECTS(self, bucket, prefix, delimiter, marker, max_keys)
    prefix = prefix or ""
    with _LOCK:
        above = (self._pagination_tokens.get(marker) or marker) if marker else None
        keys = (k for k in _walk(bucket, prefix, delimiter, above, folders=False))
        page, truncated, token = _page(self, keys, max_keys)
        folders = [f for f in _walk(bucket, prefix, delimiter, None) if not isinstance(f, FakeKey)] \
            if delimiter else []
    return page, folders, truncated, token


def list_objects_v2(self: S3Backend, bucket: FakeBucket, prefix: str | None, delimiter: str | None,
                    continuation_token: str | None, start_after: str | None, max_keys: int):
    """ListObjectsV2, as moto answers it: keys and common prefixes together, in name order, after
    the continuation token's key (else ``start_after``)."""
    if not isinstance(bucket.keys, _SortedKeyStore):
        return _MOTO_LIST_OBJECTS_V2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
    with _LOCK:
        above = None
        if continuation_token or start_after:
            above = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        return _page(self, _walk(bucket, prefix or "", delimiter, above), max_keys)


_MOTO_LIST_OBJECTS = S3Backend.list_objects
_MOTO_LIST_OBJECTS_V2 = S3Backend.list_objects_v2
_MOTO_BUCKET_INIT = FakeBucket.__init__


def _bucket_init(self: FakeBucket, *args, **kwargs) -> None:
    _MOTO_BUCKET_INIT(self, *args, **kwargs)
    self.keys = _SortedKeyStore(self.keys)


def aware_datetime(value):
    """moto's serializer's ``parse_to_aware_datetime``, with S3's ISO text parsed without dateutil."""
    return _MOTO_AWARE_DATETIME(timestamps.parse(value) if isinstance(value, str) else value)


_MOTO_AWARE_DATETIME = serialize.parse_to_aware_datetime


def install() -> None:
    """Buckets made from now on keep a sorted index; listings use it; timestamps are written
    without dateutil."""
    serialize.parse_to_aware_datetime = aware_datetime
    FakeBucket.__init__ = _bucket_init
    S3Backend.list_objects = list_objects
    S3Backend.list_objects_v2 = list_objects_v2


def main(port: int) -> None:
    """``moto_server -H 127.0.0.1 -p PORT`` (threaded) with these listings, until killed."""
    from moto.server import main as moto_server

    install()
    moto_server(["-H", "127.0.0.1", "-p", str(port)])


if __name__ == "__main__":
    main(int(sys.argv[1]))
