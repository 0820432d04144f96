"""The output layout and its commit protocol (see DESIGN.md, "Commit").

    OUTPUT/data/part-<shard>-<attempt>.parquet   rows of one shard attempt (attempt-unique key)
    OUTPUT/_manifest/<shard>.json                 the commit: one small PUT, written after the data
    OUTPUT/_failed/<shard>.json                   a shard that used up its retries, with its error
    OUTPUT/_SUCCESS.json                          the job summary, written last, when the job succeeded
    OUTPUT/_FAILED.json                           or the summary of a job that ended without success, and why
    OUTPUT/README.md                              the dataset card

Readers and resumes trust manifests only: a data file without a manifest is an orphan,
removed when the job finishes. Every manifest carries the job fingerprint and the rows its
shard holds (file, size and version, first row, row count); a run refuses to write into an
output that holds another fingerprint, or a shard whose rows its own plan does not hold.
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

from illada_batch.errors import FingerprintMismatch, LockHeld, RowRangeMismatch
from illada_batch.job import storage
from illada_batch.job.manifest_index import read_json_files, read_manifests
from illada_batch.job.records import JobSummary, Manifest, RowRange, ShardStats
from illada_batch.job.storage import Store

LOCK_STALE_SECONDS = 60  # a run whose heartbeat is older than this is presumed dead
LOCK_HEARTBEAT_SECONDS = 10


class Output:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.store = Store(fs)
        self.unindexed: list[Manifest] = []  # manifests the last ``manifests()`` read outside the index

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- writing (replicas) ----------------------------------------------------------

    def write_shard(self, shard_id: str, rows: RowRange, table: pa.Table, fingerprint: str,
                    stats: ShardStats) -> Manifest:
        """Data to an attempt-unique key, then the manifest. Returns the manifest."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        name = f"part-{shard_id}-{uuid.uuid4().hex[:12]}.parquet"
        self.store.put(self.key("data", name), data, orphan_tag=True)
        self.store.mark_committed(self.key("data", name))
        manifest = Manifest(shard_id, f"data/{name}", table.num_rows, hashlib.sha256(data).hexdigest(), fingerprint,
                            time.time(), rows, stats)
        self.store.put(self.key("_manifest", f"{shard_id}.json"), manifest.to_json())
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
        return {body["shard_id"]: body for body in read_json_files(self.fs, files)}

    def manifests(self) -> dict[str, Manifest]:
        """Every committed manifest (through the index where the listing confirms it: ``manifest_index.py``)."""
        self.fs.invalidate_cache()
        self.unindexed = []
        return read_manifests(self.fs, self.root, self.unindexed)

    def failures(self) -> dict[str, dict]:
        return self._read_json_dir("_failed")

    def trusted_manifests(self, fingerprint: str, plan: dict[str, RowRange], samples_per_row: int) -> dict[str, Manifest]:
        """Committed manifests of this job and this plan. Refuses (before anything is written)
        when any was made with another fingerprint, or holds rows the plan does not hold in
        that shard (``shard_rows`` changed, a file grew, was replaced or left the listing):
        trusting it would write some rows twice and skip others."""
        manifests = self.manifests()
        other = {m.fingerprint for m in manifests.values()} - {fingerprint}
        if other:
            raise FingerprintMismatch(
                f"{self.root} already holds shards made with fingerprint {sorted(other)[0]} (this job: {fingerprint}): "
                "the model, its dtype, the backend, engine.cache, sampling parameters, template, prefix, seed, n or "
                "input changed (or an older illada-batch made it, whose fingerprints differ). Refusing to mix "
                "outputs: write to another output.url, or delete the old output.")
        for sid, m in sorted(manifests.items()):
            planned = plan.get(sid)
            if planned is None:
                why = f"{m.rows.describe() if m.rows else 'its rows'} are in no shard of this plan"
            elif m.rows is None:  # written before manifests carried a row range: its row count is all there is
                why = None if m.samples == planned.num_rows * samples_per_row else \
                    f"it holds {m.samples} samples, the plan's shard {planned.num_rows * samples_per_row}"
            else:
                why = m.rows.difference(planned)
            if why:
                raise RowRangeMismatch(
                    f"{self.root} holds shard {sid} whose rows this run would not write the same way: {why}. "
                    "Refusing to mix outputs (some rows would be written twice, others never): run with the "
                    "input and shard_rows that made it, write to another output.url, or delete the old output.")
        return manifests

    def summary(self) -> JobSummary | None:
        """The summary the last finished run wrote (``_SUCCESS.json`` or ``_FAILED.json``), if any."""
        self.fs.invalidate_cache()  # a listing cached earlier in this process would hide a summary written since
        for name in ("_SUCCESS.json", "_FAILED.json"):
            try:
                return JobSummary.from_dict(json.loads(self.fs.cat_file(self.key(name))))
            except FileNotFoundError:
                continue
        return None

    # --- finishing (driver) ----------------------------------------------------------

    def remove_orphans(self, manifests: dict[str, Manifest]) -> int:
        keep = {m.data_key for m in manifests.values()}
        try:
            files = self.fs.ls(self.key("data"), detail=False)
        except FileNotFoundError:
            return 0
        orphans = [f for f in files if f"data/{f.rsplit('/', 1)[-1]}" not in keep]
        for f in orphans:
            self.fs.rm(f)
        return len(orphans)

    def clear_failures(self, keep) -> None:
        """Remove the failure records of every shard but ``keep`` (those that failed in this run)."""
        for sid in set(self.failures()) - set(keep):
            self._rm(self.key("_failed", f"{sid}.json"))

    def write_summary(self, summary: JobSummary, card: str | None) -> None:
        """``_SUCCESS.json`` when the job succeeded, else ``_FAILED.json`` (the other one removed)."""
        if card is not None:
            self.store.put(self.key("README.md"), card.encode())
        name, other = ("_SUCCESS.json", "_FAILED.json") if summary.ok else ("_FAILED.json", "_SUCCESS.json")
        self._rm(self.key(other))
        self.store.put(self.key(name), summary.to_json())

    def _rm(self, key: str) -> None:
        try:
            self.fs.rm(key)
        except FileNotFoundError:
            pass


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
