"""The output layout and its commit protocol (see DESIGN.md, "Commit").

    OUTPUT/_attempts/part-<shard>-<attempt>.json  the record of an attempt, written before its data file
    OUTPUT/data/part-<shard>-<attempt>.parquet   rows of one shard attempt (attempt-unique key)
    OUTPUT/_manifest/<shard>.json                 the commit: one small PUT, written after the data
    OUTPUT/_failed/<shard>.json                   a shard that used up its retries, with its error
    OUTPUT/_SUCCESS.json                          the job summary, written last, when the job succeeded
    OUTPUT/_FAILED.json                           or the summary of a job that ended without success, and why
    OUTPUT/README.md                              the dataset card (marked as the job's own)

Readers and resumes trust manifests only, and a manifest only while its data file is there
with the size (and on S3 the ETag) it recorded: a missing or damaged data file, or a manifest
that cannot be read, leaves its shard not committed, and a re-run redoes it. A data file
without a manifest is an orphan: removed when the job finishes, but only when an attempt
record says this job wrote it. Nothing else is ever removed or overwritten: a run refuses an
output that holds files it does not recognise (``foreign_files``), before any work. Every
manifest carries the job fingerprint and the rows its shard holds (file, size and version,
first row, row count); a run refuses to write into an output that holds another
fingerprint, or a shard whose rows its own plan does not hold.
"""

from __future__ import annotations

import contextlib
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

from illada_batch.errors import FingerprintMismatch, LockHeld, OutputError, RowRangeMismatch
from illada_batch.job import storage
from illada_batch.job.records import JobSummary, Manifest, RowRange, ShardStats
from illada_batch.job.storage import Store, is_transient

LOCK_STALE_SECONDS = 60  # a run whose heartbeat is older than this is presumed dead
LOCK_HEARTBEAT_SECONDS = 10
ATTEMPTS = "_attempts"
RECORD_FOLDERS = ("_manifest", "_failed", ATTEMPTS)  # each holds only the job's .json records
TOP_FILES = ("_SUCCESS.json", "_FAILED.json", "_LOCK.json")
# the last line of every dataset card the job writes: a README.md without it is the user's
CARD_MARK = "<!-- written by illada-batch: this file is rewritten when the job finishes -->"


class Output:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.store = Store(fs)

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- writing (replicas) ----------------------------------------------------------

    def write_shard(self, shard_id: str, rows: RowRange, table: pa.Table, fingerprint: str,
                    stats: ShardStats, duplicate_rows=()) -> Manifest:
        """An attempt record, the data to an attempt-unique key, then the manifest. Returns the
        manifest. A write the store refuses (read-only, access denied) is an ``OutputError``."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        name = f"part-{shard_id}-{uuid.uuid4().hex[:12]}"
        with writing(self.root):
            record = {"shard_id": shard_id, "data_key": f"data/{name}.parquet", "fingerprint": fingerprint,
                      "at": time.time()}
            self.store.put(self.key(ATTEMPTS, f"{name}.json"), json.dumps(record).encode())  # before the data
            self.store.put(self.key("data", f"{name}.parquet"), data, orphan_tag=True)
            self.store.mark_committed(self.key("data", f"{name}.parquet"))
            manifest = Manifest(shard_id, f"data/{name}.parquet", table.num_rows, hashlib.sha256(data).hexdigest(),
                                fingerprint, time.time(), rows, stats, len(data), hashlib.md5(data).hexdigest(),
                                tuple(duplicate_rows))
            self.store.put(self.key("_manifest", f"{shard_id}.json"), manifest.to_json())
        return manifest

    def record_failure(self, shard_id: str, fingerprint: str, error: str, attempts: int) -> None:
        body = {"shard_id": shard_id, "fingerprint": fingerprint, "error": error, "attempts": attempts, "at": time.time()}
        with writing(self.root):
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
            with writing(self.root):
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

    def _read_json_dir(self, folder: str) -> tuple[dict[str, dict], dict[str, str]]:
        """({shard id: body}, {shard id: why its file cannot be read}); the shard id of an
        unreadable record is its file name's."""
        try:
            files = [f for f in self.fs.ls(self.key(folder), detail=False) if f.endswith(".json")]
        except FileNotFoundError:
            return {}, {}
        out, bad = {}, {}
        for f in files:
            sid = f.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                body = json.loads(self.fs.cat_file(f))
                out[body["shard_id"]] = body
            except (ValueError, KeyError, TypeError) as exc:  # empty, truncated, not a record
                bad[sid] = f"{folder}/{sid}.json cannot be read ({type(exc).__name__}: {exc or 'empty'})"
        return out, bad

    def read_manifests(self) -> tuple[dict[str, Manifest], dict[str, str]]:
        """(readable manifests, {shard id: why its manifest cannot be read})."""
        self.fs.invalidate_cache()
        bodies, bad = self._read_json_dir("_manifest")
        out = {}
        for sid, body in bodies.items():
            try:
                out[sid] = Manifest.from_json(body)
            except (KeyError, TypeError, ValueError) as exc:
                bad[sid] = f"_manifest/{sid}.json cannot be read ({type(exc).__name__}: {exc})"
        return out, bad

    def manifests(self) -> dict[str, Manifest]:
        return self.read_manifests()[0]

    def failures(self) -> dict[str, dict]:
        bodies, bad = self._read_json_dir("_failed")
        return {**bodies, **{sid: {"shard_id": sid, "error": why} for sid, why in bad.items()}}

    def damaged(self, manifests: dict[str, Manifest]) -> dict[str, str]:
        """{shard id: why} for each manifest whose data file is missing, or differs from what
        the manifest recorded: its size anywhere; on S3 also its ETag, which for a one-part PUT
        is the MD5 of the data. One listing of ``data/``; no data file is read."""
        try:
            listing = {e["name"].rsplit("/", 1)[-1]: e for e in self.fs.ls(self.key("data"), detail=True)}
        except FileNotFoundError:
            listing = {}
        out = {}
        for sid, m in manifests.items():
            entry = listing.get(m.data_key.rsplit("/", 1)[-1])
            etag = str((entry or {}).get("ETag") or "").strip('"')
            if entry is None:
                out[sid] = f"its data file {m.data_key} is missing"
            elif m.data_size is not None and int(entry.get("size") or 0) != m.data_size:
                out[sid] = f"its data file {m.data_key} has {entry.get('size')} bytes, the manifest says {m.data_size}"
            elif m.data_md5 and etag and "-" not in etag and etag != m.data_md5:
                out[sid] = f"its data file {m.data_key} has ETag {etag}, the manifest recorded MD5 {m.data_md5}"
        return out

    def untrusted(self, manifests: dict[str, Manifest], unreadable: dict[str, str]) -> dict[str, str]:
        """{shard id: why it is not committed} for unreadable manifests and damaged data files."""
        return {**unreadable, **{sid: f"shard {sid}: {why}" for sid, why in self.damaged(manifests).items()}}

    def attempts(self) -> set[str]:
        """Names (``part-<shard>-<attempt>``) of the data files this output's job recorded writing."""
        try:
            files = self.fs.ls(self.key(ATTEMPTS), detail=False)
        except FileNotFoundError:
            return set()
        return {f.rsplit("/", 1)[-1].removesuffix(".json") for f in files if f.endswith(".json")}

    def foreign_files(self, manifests: dict[str, Manifest]) -> list[str]:
        """Paths under the output (relative; a folder ends in ``/``) that this job did not
        write: anything but its records, the data files its manifests or attempt records
        name, and a README.md that carries ``CARD_MARK``. Folders are named, not walked."""
        self.fs.invalidate_cache()
        try:
            top = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        own_data = {m.data_key.rsplit("/", 1)[-1] for m in manifests.values()} | \
            {f"{name}.parquet" for name in self.attempts()}
        foreign = []
        for entry in top:
            name, is_dir = entry["name"].rstrip("/").rsplit("/", 1)[-1], entry["type"] == "directory"
            if entry["name"].rstrip("/") == self.root:
                continue
            if is_dir and name in (*RECORD_FOLDERS, "data"):
                for child in self.fs.ls(self.key(name), detail=True):
                    cname = child["name"].rstrip("/").rsplit("/", 1)[-1]
                    ok = child["type"] != "directory" and (cname in own_data if name == "data"
                                                           else cname.endswith(".json"))
                    if not ok:
                        foreign.append(f"{name}/{cname}" + ("/" if child["type"] == "directory" else ""))
            elif is_dir or not (name in TOP_FILES or (name == "README.md" and self._own_card())):
                foreign.append(name + ("/" if is_dir else ""))
        return sorted(foreign)

    def _own_card(self) -> bool:
        try:
            return CARD_MARK in self.fs.cat_file(self.key("README.md")).decode("utf-8", "replace")
        except FileNotFoundError:
            return True

    def trusted_manifests(self, fingerprint: str, plan: dict[str, RowRange], samples_per_row: int,
                          manifests: dict[str, Manifest] | None = None,
                          unreadable: dict[str, str] | None = None) -> dict[str, Manifest]:
        """Committed manifests of this job and this plan (see ``resume_state``)."""
        if manifests is None:
            manifests, unreadable = self.read_manifests()
        return self.resume_state(fingerprint, plan, samples_per_row, manifests, unreadable or {})[0]

    def resume_state(self, fingerprint: str, plan: dict[str, RowRange], samples_per_row: int,
                     manifests: dict[str, Manifest], unreadable: dict[str, str],
                     ) -> tuple[dict[str, Manifest], dict[str, str]]:
        """(committed manifests of this job and this plan, {shard id: why it is redone}).
        Refuses (before anything is written) when any was made with another fingerprint, or
        holds rows the plan does not hold in that shard (``shard_rows`` changed, a file grew,
        was replaced or left the listing): trusting it would write some rows twice and skip
        others. A manifest that cannot be read, or whose data file is missing or damaged, is
        not trusted: its shard is redone (refused when the plan has no such shard)."""
        other = {m.fingerprint for m in manifests.values()} - {fingerprint}
        if other:
            raise FingerprintMismatch(
                f"{self.root} already holds shards made with fingerprint {sorted(other)[0]} (this job: {fingerprint}): "
                "the model, sampling parameters, template, prefix, seed, n or input changed. Refusing to mix "
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
        stray = sorted(sid for sid in unreadable if sid not in plan)
        if stray:
            raise RowRangeMismatch(f"{self.root}: {unreadable[stray[0]]}, and this run's plan has no shard {stray[0]}: "
                                   "remove that file, or run with the input and shard_rows that made it.")
        redo = self.untrusted(manifests, unreadable)
        return {sid: m for sid, m in manifests.items() if sid not in redo}, redo

    def summary(self) -> JobSummary | None:
        """The summary the last finished run wrote (``_SUCCESS.json`` or ``_FAILED.json``), if any."""
        for name in ("_SUCCESS.json", "_FAILED.json"):
            try:
                return JobSummary.from_dict(json.loads(self.fs.cat_file(self.key(name))))
            except FileNotFoundError:
                continue
        return None

    # --- finishing (driver) ----------------------------------------------------------

    def remove_orphans(self, manifests: dict[str, Manifest]) -> int:
        """Remove the recorded attempts (data file, then record) that no manifest names. A
        data file without an attempt record is never touched (``foreign_files`` names it)."""
        keep = {m.data_key.rsplit("/", 1)[-1] for m in manifests.values()}
        orphans = sorted(name for name in self.attempts() if f"{name}.parquet" not in keep)
        with writing(self.root):
            for name in orphans:
                self._rm(self.key("data", f"{name}.parquet"))
                self._rm(self.key(ATTEMPTS, f"{name}.json"))
        return len(orphans)

    def clear_failures(self, keep) -> None:
        """Remove the failure records of every shard but ``keep`` (those that failed in this run)."""
        with writing(self.root):
            for sid in set(self.failures()) - set(keep):
                self._rm(self.key("_failed", f"{sid}.json"))

    def write_summary(self, summary: JobSummary, card: str | None) -> None:
        """``_SUCCESS.json`` when the job succeeded, else ``_FAILED.json`` (the other one removed).
        The card is written only over a README.md the job wrote (or none)."""
        with writing(self.root):
            if card is not None and self._own_card():
                self.store.put(self.key("README.md"), f"{card.rstrip()}\n\n{CARD_MARK}\n".encode())
            name, other = ("_SUCCESS.json", "_FAILED.json") if summary.ok else ("_FAILED.json", "_SUCCESS.json")
            self._rm(self.key(other))
            self.store.put(self.key(name), summary.to_json())

    def _rm(self, key: str) -> None:
        try:
            self.fs.rm(key)
        except FileNotFoundError:
            pass


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
