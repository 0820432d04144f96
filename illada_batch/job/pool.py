"""The job's replicas and their lives: placed by Ray, started (model loaded), working, gone.

Design note. A replica is given shards only once it has started, so a replica Ray cannot
place never holds work: its shards stay in the queue for the replicas that did start. Whether
a replica not ready yet is placed is its placement group's state (``placements.py``, Ray's
public API): reserved means placed, its worker maybe still starting on a busy node. One not
placed within ``placement_timeout_s`` is reported with what it asked for and what the
cluster has, and given up; when no replica is left, the job stops with that message (a
``ClusterError``) instead of waiting in silence. Starting a replica loads its model in
``start()``, a plain call, so the model's own error reaches the driver: an error no retry
can fix (missing model, wrong checksum, unsupported config) stops the job once
(``JobStopped``); any other start failure is retried on a new replica, a bounded number of
times. A replica that dies while working is replaced by a new actor.

Replicas as a range (``replicas: {min, max}``): the pool asks for ``max``. On a cluster that
may grow, the unplaced ones beyond the ``min`` the job needs are never given up: they are
pending placement groups, which Ray's autoscaler sees as demand, and they start when a node appears.
Once no shard is left to hand out, idle replicas are stopped (``retire_idle``), so the
cluster can shrink.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from illada_batch.errors import CheckpointError, ClusterError, ConfigError, JobStopped, ParamsError, SpecError

# errors a replica raises that are the same on every try: the job stops once, with this message
FATAL = (CheckpointError, ConfigError, ParamsError, SpecError)


def cause_of(exc: BaseException) -> BaseException:
    """The exception raised inside a remote call (Ray wraps it)."""
    return exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc


def death_reason(exc: BaseException) -> str:
    """One line for a replica that died: Ray's exit detail when it gives one."""
    text = str(exc)
    detail = re.search(r"exit detail: (.+?)(?:\. |\n|$)", text)
    if detail:
        return f"{type(exc).__name__}: {detail.group(1).strip()}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class _Slot:
    handle: object
    created: float
    ready: object | None  # ``__ray_ready__`` until Ray has placed the actor
    started: object | None = None  # ``start()`` until the model has loaded
    up: bool = False
    start_failures: int = 0


class ReplicaPool:
    def __init__(self, make, count: int, request: dict, placement_timeout_s: float, max_start_failures: int,
                 log, end, reserved, needed: int | None = None, can_grow: bool = False) -> None:
        """``end(handle)``: how a replica is ended (its placement group removed too);
        ``reserved(handle)``: whether its resources are set aside on a node (``placements.py``)."""
        self.make, self.timeout, self.log, self.end, self.reserved = make, placement_timeout_s, log, end, reserved
        self.needed = count if needed is None else min(needed, count)  # fewer placed than this: reported
        self.can_grow = can_grow
        self.waiting: set[int] = set()  # replicas beyond ``needed`` left pending as demand (said once each)
        self.request = {k: v for k, v in request.items() if v}  # what one replica asks Ray for
        self.max_start_failures = max_start_failures
        self.slots: list[_Slot | None] = [self._new() for _ in range(count)]
        self.gone: list[str] = []  # why each given-up replica was given up

    def _new(self, start_failures: int = 0) -> _Slot:
        handle = self.make()
        return _Slot(handle, time.time(), handle.__ray_ready__.remote(), start_failures=start_failures)

    def up(self) -> list[int]:
        """Indexes of the replicas that may be given shards."""
        return [i for i, s in enumerate(self.slots) if s is not None and s.up]

    def handle(self, i: int):
        return self.slots[i].handle

    def placed(self) -> int:
        """Replicas Ray has placed: working, or loading their model."""
        return sum(1 for s in self.slots if s is not None and s.ready is None)

    def starting(self) -> int:
        return sum(1 for s in self.slots if s is not None and not s.up)

    def poll(self) -> None:
        """Advance every replica not yet working; raises ``JobStopped`` on an unfixable start
        error and ``ClusterError`` when no replica is left."""
        overdue = []
        for i, slot in enumerate(self.slots):
            if slot is None or slot.up:
                continue
            if slot.ready is not None:
                if self._poll_placement(i, slot):
                    overdue.append(i)
            elif slot.started is not None and ray.wait([slot.started], timeout=0)[0]:
                self._poll_start(i, slot)
        if overdue:
            self._give_up_unplaced(overdue)
        if not any(s is not None for s in self.slots):
            raise ClusterError("no replica is running: " + "; ".join(self.gone[-3:]))

    def _poll_placement(self, i: int, slot: _Slot) -> bool:
        """True when the replica is overdue: not ready after the timeout, and not placed."""
        if ray.wait([slot.ready], timeout=0)[0]:
            try:
                ray.get(slot.ready)
            except RayActorError as exc:
                self._start_failed(i, slot, death_reason(exc))
                return False
            slot.ready, slot.started = None, slot.handle.start.remote()
            return False
        return time.time() - slot.created > self.timeout and not self.reserved(slot.handle)

    def _give_up_unplaced(self, overdue: list[int]) -> None:
        """Give up the overdue replicas; on a cluster that may grow, those beyond what the job
        needs stay, as demand."""
        if self.can_grow:
            others = sum(1 for i, s in enumerate(self.slots) if s is not None and i not in overdue)
            keep = len(overdue) - max(0, self.needed - others)  # overdue replicas beyond the needed ones
            for i in overdue[len(overdue) - max(0, keep):]:
                if i not in self.waiting:
                    self.waiting.add(i)
                    self.log(f"replica {i + 1} waits for the cluster to grow: it asks for "
                             f"{resources_text(self.request)}; {cluster_resources_text()}")
            overdue = overdue[:len(overdue) - max(0, keep)]
        for i in overdue:
            why = (f"replica {i + 1} was not placed within {self.timeout:g} s: it asks for "
                   f"{resources_text(self.request)}; {cluster_resources_text()}")
            self._give_up(i, why)
            self.log(why + ("; the shards go to the other replicas" if any(self.slots) else ""))

    def _poll_start(self, i: int, slot: _Slot) -> None:
        try:
            ray.get(slot.started)
        except RayTaskError as exc:
            cause = cause_of(exc)
            if isinstance(cause, FATAL):
                raise JobStopped(f"a replica could not start: {cause}") from None
            self._start_failed(i, slot, f"{type(cause).__name__}: {cause}")
            return
        except RayActorError as exc:
            self._start_failed(i, slot, death_reason(exc))
            return
        slot.started, slot.up = None, True

    def _start_failed(self, i: int, slot: _Slot, error: str) -> None:
        failures = slot.start_failures + 1
        if failures > self.max_start_failures:
            why = f"replica {i + 1} failed to start {failures} times: {error}"
            self.log(why)
            self._give_up(i, why)
            return
        self.log(f"replica {i + 1} failed to start ({error}); starting a new one")
        self.end(slot.handle)
        self.slots[i] = self._new(failures)

    def _give_up(self, i: int, why: str) -> None:
        self.end(self.slots[i].handle)  # a pending actor would otherwise take the resources later
        self.slots[i] = None
        self.gone.append(why)

    def retire_idle(self, busy: set[int]) -> None:
        """No shard is left to hand out: stop the replicas not in ``busy`` (their engines closed
        first) and those not yet started, so that the cluster may shrink."""
        idle = [i for i, s in enumerate(self.slots) if s is not None and i not in busy]
        up = [self.slots[i].handle for i in idle if self.slots[i].up]
        if up:
            try:
                ray.get([h.close.remote() for h in up], timeout=60)
            except (GetTimeoutError, RayActorError, RayTaskError):
                pass
        for i in idle:
            self.end(self.slots[i].handle)
            self.slots[i] = None
        if idle:
            self.log(f"no shard left for {len(idle)} replica(s): stopped")

    def replace(self, i: int) -> None:
        """The replica died while working: a new actor takes its place."""
        slot = self.slots[i]
        if slot is not None:
            self.end(slot.handle)
            self.slots[i] = self._new()

    def close(self, graceful: bool) -> None:
        """End the replicas; when none has work left, first shut each engine down (vLLM's wants
        that before Ray goes away). After an error or an interrupt they are killed at once."""
        live = [s for s in self.slots if s is not None]
        if graceful and any(s.up for s in live):
            try:
                ray.get([s.handle.close.remote() for s in live if s.up], timeout=60)
            except (GetTimeoutError, RayActorError, RayTaskError):
                pass
        for s in live:
            self.end(s.handle)


def resources_text(res: dict) -> str:
    """``{'CPU': 2.0, 'GPU': 1}`` as ``2 CPU, 1 GPU`` (CPU, GPU and accelerators only)."""
    kept = [f"{float(v):g} {k}" for k, v in sorted(res.items())
            if v and (k in ("CPU", "GPU") or k.startswith("accelerator"))]
    return ", ".join(kept) or "nothing"


def cluster_resources_text() -> str:
    return (f"the cluster has {resources_text(ray.cluster_resources())} in total, "
            f"{resources_text(ray.available_resources())} free")


def check_fits(request: dict) -> None:
    """Refuse at once a replica that no node of a cluster that cannot grow could ever hold."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    request = {k: v for k, v in request.items() if v}
    if not any(all(node.get(k, 0) >= v for k, v in request.items()) for node in nodes):
        raise ClusterError(f"a replica asks for {resources_text(request)}, which no node of this cluster has; "
                           f"{cluster_resources_text()} (set resources.num_cpus / num_gpus, or run on a cluster "
                           f"that has them with --address)")
