"""The manifest index: ``OUTPUT/_index/<segment>.jsonl``, the manifests a driver received,
compacted into one PUT per ``SEGMENT_MANIFESTS`` commits (and at the end of the run), so
that a resume or ``status`` at 10^5 shards reads a hundred segments instead of 10^5 files.

The index is a cache, never the truth: manifests stay the commit. A reader lists
``_manifest/`` (one LIST per thousand keys) and trusts an index entry only where the
listing shows that manifest with the content hash the entry recorded (S3's ETag, the MD5 of
a body written in one PUT); every other manifest (committed after the last segment was
written, rewritten since, or on a store whose listing has no content hash) is read itself,
many GETs at once. So a crash between a commit and its segment costs a few GETs, never a
wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from illada_batch.job.records import Manifest
from illada_batch.job.storage import cat_files, writing

SEGMENT_MANIFESTS = 1000  # manifests per index segment
SEGMENT_SECONDS = 60.0  # or a segment at least this often while manifests arrive
READ_BATCH = 256  # manifests fetched at once (the store's GETs run concurrently)
SEGMENT_BATCH = 8  # segments fetched at once (about 0.7 MB each)


class IndexWriter:
    """What the driver keeps of the manifests it received: their bodies' hashes, written out
    as index segments. Holds at most one segment's manifests between writes."""

    def __init__(self, out) -> None:
        self.out, self.pending, self.last = out, [], time.time()

    def add(self, m: Manifest) -> None:
        self.pending.append(m)
        if len(self.pending) >= SEGMENT_MANIFESTS or time.time() - self.last >= SEGMENT_SECONDS:
            self.flush()

    def add_all(self, manifests: list[Manifest]) -> None:
        for m in manifests:
            self.add(m)
        self.flush()

    def flush(self) -> None:
        if self.pending:
            # one line per manifest: shard id, MD5 of the manifest's bytes, the manifest (a reader
            # parses only the manifests the listing confirms)
            lines = [f"{m.shard_id}\t{hashlib.md5(body).hexdigest()}\t{body.decode()}"
                     for m, body in ((m, m.to_json()) for m in self.pending)]
            name = f"{time.time():017.6f}-{uuid.uuid4().hex[:8]}.jsonl"
            with writing(self.out.root):  # a read-only output: one OutputError, as every other write
                self.out.store.put(self.out.key("_index", name), ("\n".join(lines) + "\n").encode())
            self.pending = []
        self.last = time.time()


def read_manifests(fs, root: str, unindexed: list | None = None,
                   others: list | None = None) -> tuple[dict[str, Manifest], dict[str, str]]:
    """(every readable manifest under ``root``, {shard id: why its manifest cannot be read}):
    index entries the listing confirms, the rest read (and appended to ``unindexed``, for a
    writer to index them: a resume compacts what a crashed run left unindexed). ``others``
    gets the listing's entries that are not manifests (name, is a folder): what
    ``Output.foreign_files`` would list ``_manifest/`` again for."""
    try:
        entries = fs.ls(f"{root}/_manifest", detail=True)
    except FileNotFoundError:
        return {}, {}
    listed = {}
    for f in entries:
        if f["name"].endswith(".json") and f["type"] != "directory":
            listed[f["name"]] = _etag(f)
        elif others is not None:
            others.append((f["name"].rstrip("/").rsplit("/", 1)[-1], f["type"] == "directory"))
    del entries
    fs.invalidate_cache(f"{root}/_manifest")  # the listing's details are not kept for the run
    hashed = any(listed.values())  # else the index cannot be checked: not used
    indexed = _index_entries(fs, root) if hashed else {}
    manifests, unread = {}, []
    for name, etag in listed.items():
        sid = name.rsplit("/", 1)[-1][:-len(".json")]
        entry = indexed.pop(sid, None)
        if entry is not None and entry[0] == etag:
            manifests[sid] = Manifest.from_json(json.loads(entry[1]))
        else:
            unread.append(name)
    del indexed
    bad = {}
    for name, raw in _fetch(fs, unread):
        sid = name.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            m = Manifest.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:  # empty, truncated, not a manifest
            bad[sid] = f"_manifest/{sid}.json cannot be read ({type(exc).__name__}: {exc or 'empty'})"
            continue
        manifests[m.shard_id] = m
        if unindexed is not None and hashed:
            unindexed.append(m)
    return manifests, bad


def _fetch(fs, paths: list[str]):
    """(path, bytes) of each file, ``READ_BATCH`` fetched at once (concurrently on an async store)."""
    for i in range(0, len(paths), READ_BATCH):
        chunk = paths[i:i + READ_BATCH]
        bodies = cat_files(fs, chunk)
        for p in chunk:
            yield p, bodies[p]


def _index_entries(fs, root: str) -> dict[str, tuple[str, str]]:
    """shard id -> (md5, manifest JSON) from every segment, a later segment's entry first."""
    try:
        segments = sorted(f for f in fs.ls(f"{root}/_index", detail=False) if f.endswith(".jsonl"))
    except FileNotFoundError:
        return {}
    entries: dict[str, tuple[str, str]] = {}
    for i in range(0, len(segments), SEGMENT_BATCH):
        chunk = segments[i:i + SEGMENT_BATCH]
        bodies = cat_files(fs, chunk)
        for seg in chunk:
            for line in bodies.pop(seg).decode().splitlines():
                if line:
                    sid, md5, body = line.split("\t", 2)
                    entries[sid] = (md5, body)
    return entries


def _etag(info: dict) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"') if tag else None
