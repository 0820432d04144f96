"""The output layout and its commit protocol (see DESIGN.md, "Commit").

    OUTPUT/data/part-<shard>-<attempt>.parquet   rows of one shard attempt (attempt-unique key)
    OUTPUT/_manifest/<shard>.json                 the commit: one small PUT, written after the data
    OUTPUT/_failed/<shard>.json                   a shard that used up its retries, with its error
    OUTPUT/_SUCCESS.json                          the job summary, written last
    OUTPUT/README.md                              the dataset card

Readers and resumes trust manifests only: a data file without a manifest is an orphan,
removed when the job finishes. Every manifest carries the job fingerprint, and a run with
another fingerprint refuses to write into the same output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from illada_batch.errors import FingerprintMismatch, LockHeld
from illada_batch.job import storage
from illada_batch.job.storage import Store

LOCK_STALE_SECONDS = 60  # a run whose heartbeat is older than this is presumed dead
LOCK_HEARTBEAT_SECONDS = 10


class Output:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.store = Store(fs)

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- writing (replicas) ----------------------------------------------------------

    def write_shard(self, shard_id: str, table: pa.Table, fingerprint: str, stats: dict) -> dict:
        """Data to an attempt-unique key, then the manifest. Returns the manifest."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        name = f"part-{shard_id}-{uuid.uuid4().hex[:12]}.parquet"
        self.store.put(self.key("data", name), data, orphan_tag=True)
        self.store.mark_committed(self.key("data", name))
        manifest = {"shard_id": shard_id, "data_key": f"data/{name}", "rows": table.num_rows,
                    "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": fingerprint,
                    "committed_at": time.time(), **stats}
        self.store.put(self.key("_manifest", f"{shard_id}.json"), json.dumps(manifest).encode())
        return manifest

    def record_failure(self, shard_id: str, fingerprint: str, error: str, attempts: int) -> None:
        body = {"shard_id": shard_id, "fingerprint": fingerprint, "error": error, "attempts": attempts, "at": time.time()}
        self.store.put(self.key("_failed", f"{shard_id}.json"), json.dumps(body).encode())

    # --- one writer at a time (driver) ----------------------------------------------------

    def acquire_lock(self, owner: str) -> None:
        """Take ``_LOCK.json`` or raise ``LockHeld``, before anything else is written.

        The lock is created exclusively (a conditional PUT on S3, O_EXCL locally), so of two
        runs started at once exactly one gets it. A lock whose heartbeat is older than
        LOCK_STALE_SECONDS, or that names a process of this host that no longer exists,
        belongs to a dead run: it is replaced, then read back after a
        pause so that of two runs taking over at once only the last writer goes on."""
        key = self.key("_LOCK.json")
        body = _lock_body(owner)
        try:
            self.store.create_exclusive(key, body)
            return
        except FileExistsError:
            pass
        current = self._read_lock()
        if current and current["owner"] != owner and not _is_stale(current):
            raise LockHeld(self._held_message(current))
        self.store.put(key, body)  # take over a stale lock
        time.sleep(storage.SETTLE_SECONDS)
        current = self._read_lock()
        if not current or current["owner"] != owner:
            raise LockHeld(self._held_message(current or {"owner": "another run", "heartbeat": time.time()}))

    def heartbeat(self, owner: str) -> None:
        self.store.put(self.key("_LOCK.json"), _lock_body(owner))

    def release_lock(self, owner: str) -> None:
        current = self._read_lock()
        if current and current["owner"] == owner:
            self.fs.rm(self.key("_LOCK.json"))

    def _read_lock(self) -> dict | None:
        try:
            self.fs.invalidate_cache()
            return json.loads(self.fs.cat_file(self.key("_LOCK.json")))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _held_message(self, lock: dict) -> str:
        age = time.time() - lock["heartbeat"]
        return (f"{self.root} is being written by {lock['owner']} (heartbeat {age:.0f}s ago): not starting a second "
                f"run for the same output. It is presumed dead after {LOCK_STALE_SECONDS}s without a heartbeat.")

    # --- reading (driver, status) ------------------------------------------------------

    def _read_json_dir(self, folder: str) -> dict[str, dict]:
        path = self.key(folder)
        try:
            files = [f for f in self.fs.ls(path, detail=False) if f.endswith(".json")]
        except FileNotFoundError:
            return {}
        out = {}
        for f in files:
            body = json.loads(self.fs.cat_file(f))
            out[body["shard_id"]] = body
        return out

    def manifests(self) -> dict[str, dict]:
        self.fs.invalidate_cache()
        return self._read_json_dir("_manifest")

    def failures(self) -> dict[str, dict]:
        return self._read_json_dir("_failed")

    def check_fingerprint(self, fingerprint: str) -> dict[str, dict]:
        """Committed manifests of this job; refuses when any was made by another fingerprint."""
        manifests = self.manifests()
        other = {m["fingerprint"] for m in manifests.values()} - {fingerprint}
        if other:
            raise FingerprintMismatch(
                f"{self.root} already holds shards made with fingerprint {sorted(other)[0]} (this job: {fingerprint}): "
                "the model, sampling parameters, template, prefix, seed, n or input changed. Refusing to mix "
                "outputs: write to another output.url, or delete the old output.")
        return manifests

    def success(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.key("_SUCCESS.json")))
        except FileNotFoundError:
            return None

    # --- finishing (driver) ----------------------------------------------------------

    def remove_orphans(self, manifests: dict[str, dict]) -> int:
        keep = {m["data_key"] for m in manifests.values()}
        try:
            files = self.fs.ls(self.key("data"), detail=False)
        except FileNotFoundError:
            return 0
        orphans = [f for f in files if f"data/{f.rsplit('/', 1)[-1]}" not in keep]
        for f in orphans:
            self.fs.rm(f)
        return len(orphans)

    def clear_failures(self, shard_ids) -> None:
        for sid in shard_ids:
            try:
                self.fs.rm(self.key("_failed", f"{sid}.json"))
            except FileNotFoundError:
                pass

    def write_success(self, summary: dict, card: str) -> None:
        self.store.put(self.key("README.md"), card.encode())
        self.store.put(self.key("_SUCCESS.json"), json.dumps(summary, indent=2).encode())


def _lock_body(owner: str) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "heartbeat": time.time()}).encode()


def _is_stale(lock: dict) -> bool:
    if time.time() - lock.get("heartbeat", 0) >= LOCK_STALE_SECONDS:
        return True
    if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int) and lock["pid"] != os.getpid():
        try:
            os.kill(lock["pid"], 0)
        except ProcessLookupError:
            return True  # its driver died on this machine: no need to wait for the heartbeat to age
        except PermissionError:
            pass
    return False
