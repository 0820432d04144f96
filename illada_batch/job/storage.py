"""Storage: a filesystem for any fsspec URL, which errors are worth retrying, and the few
operations whose form depends on the protocol (a tagged PUT, an exclusive create, a tag
change). The commit protocol (``commit.py``) is written against ``Store`` and never asks
which protocol it runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from illada_batch.errors import InputError, OutputError
from illada_batch.job import timestamps, xml_parse

timestamps.install()  # an S3 listing's timestamps parsed without dateutil (``timestamps.py``)
xml_parse.install()  # and its keys with each structure's plan made once (``xml_parse.py``)

_NETWORK_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure"}


def is_transient(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a network or server-side failure."""
    while exc is not None:
        if isinstance(exc, (PermissionError, FileNotFoundError)):
            return False  # credentials, a missing bucket or object: the same on every try
        status = getattr(exc, "response", None)
        status = status.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(status, dict) else None
        if status is not None:
            return status >= 500  # an S3 ClientError: 503 SlowDown is transient, 403/404 are not
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] in _NETWORK_LIBRARIES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def storage_errors(what: str, error: type[Exception] = InputError, verb: str = "cannot list", keep: tuple = ()):
    """Turn any filesystem error (network, credentials, no bucket) into one ``error`` whose
    message starts with ``what`` (``input.url s3://...``); ``error`` and ``keep`` pass through."""
    try:
        yield
    except (error, *keep):
        raise
    except PermissionError as exc:
        raise error(f"{what}: access denied ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - network/credential errors from any fsspec backend
        raise error(f"{what}: {verb} ({type(exc).__name__}: {exc})") from None


def filesystem(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or local path."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"{url}: cannot open this URL ({exc})") from None
    return fs, path



def cat_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes]:
    """{path: bytes} of small files, fetched concurrently on an async store, each in one GET:
    s3fs would otherwise ask each file's size first (a HEAD, to split a large file into
    ranges) unless a listing of its folder is cached."""
    if len(paths) == 1:
        return {paths[0]: fs.cat_file(paths[0], **_ONE_GET.get(type(fs), {}))}
    return fs.cat(paths, **_ONE_GET.get(type(fs), {}))


def list_at_once(fs: fsspec.AbstractFileSystem, folders: list[str]) -> None:
    """List ``folders`` concurrently into the store's listing cache (an async store with one,
    as s3fs), so that the ``fs.ls`` calls that follow read them from there; a folder that is
    not there, or whose listing failed, is left to those calls (which list it, and raise
    what they raise). Elsewhere nothing: each ``ls`` lists for itself."""
    cache = getattr(fs, "dircache", None)
    if not (getattr(fs, "async_impl", False) and getattr(cache, "use_listings_cache", False)):
        return
    from fsspec.asyn import sync

    async def listings():
        await asyncio.gather(*(fs._ls(f, detail=True) for f in folders), return_exceptions=True)

    sync(fs.loop, listings)


try:
    from s3fs import S3FileSystem

    # an s3fs without this parameter reads a whole file in one GET
    _ONE_GET = {S3FileSystem: {"max_concurrency": 1}} if "max_concurrency" in inspect.signature(
        S3FileSystem._cat_file).parameters else {}
except ImportError:  # no S3 support installed
    _ONE_GET = {}


ORPHAN_TAG = "illada-batch:orphan"
# without an exclusive create, a writer checks after this pause that its write is the one that stayed
SETTLE_SECONDS = 1.0


class Store:
    """An output location's filesystem with the protocol-specific parts of the commit."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs
        protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.is_s3 = "s3" in protocol

    def put(self, key: str, data: bytes, orphan_tag: bool = False) -> None:
        """One PUT. On S3 a data file is created tagged ``illada-batch:orphan=true`` (the bucket's
        lifecycle rule expires such files after 7 days) and untagged just before its manifest."""
        if self.is_s3:
            extra = {"Tagging": f"{ORPHAN_TAG}=true"} if orphan_tag else {}
            self.fs.pipe_file(key, data, **extra)
        else:
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(key, data)

    def mark_committed(self, key: str) -> None:
        """The data file ``key`` is about to be named by a manifest: no longer an orphan."""
        if self.is_s3:
            self.fs.put_tags(key, {ORPHAN_TAG: "false"}, mode="o")

    def etag(self, key: str) -> str | None:
        """The store's checksum of ``key`` (S3's ETag, whatever its encryption makes of it), or
        None where it has none (local files: their size is what a reader checks)."""
        if not self.is_s3:
            return None
        tag = self.fs.info(key, refresh=True).get("ETag")
        return str(tag).strip('"') if tag else None

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Write ``key`` only if it does not exist (FileExistsError otherwise): a conditional
        PUT on S3, O_EXCL locally; elsewhere a write that is read back after a pause."""
        if self.is_s3:
            self.fs.pipe_file(key, data, IfNoneMatch="*")
        elif isinstance(self.fs, LocalFileSystem):
            os.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            with open(key, "xb") as f:
                f.write(data)
        else:
            if self.fs.exists(key):
                raise FileExistsError(key)
            self.put(key, data)
            time.sleep(SETTLE_SECONDS)
            if json.loads(self.fs.cat_file(key)) != json.loads(data):
                raise FileExistsError(key)


@contextlib.contextmanager
def writing(root: str):
    """A write the store refuses for good (read-only, access denied, not a folder) becomes one
    ``OutputError`` naming the output; a network or server error passes through (retried)."""
    try:
        yield
    except OSError as exc:
        if is_transient(exc):
            raise
        raise OutputError(f"output.url {root}: cannot write ({type(exc).__name__}: {exc})") from None
