"""Each replica's placement group: how the driver knows, through Ray's public API, whether a
replica that is not ready yet has its resources.

Every replica is an actor in bundle 0 of a placement group of its own: one bundle of
``resources`` for a replica of one device, N bundles packed on one node (``STRICT_PACK``)
for a tensor-parallel replica of N ranks (``tp_ranks.py`` starts ranks 1..N-1 in bundles
1..N-1). A group is reserved once Ray has set aside its resources on a node; the actor may
still be starting its worker process there (a busy node), but it is placed. A group not yet
reserved is demand that Ray's autoscaler sees, and it is reserved as soon as a node can
hold it. Ending a replica removes its group, so its resources are free for the next.

A replica that asks for nothing (no CPU, no GPU) has no group: there is nothing to reserve.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def bundle(num_cpus: float, num_gpus: float) -> dict:
    return {k: v for k, v in {"CPU": num_cpus, "GPU": num_gpus}.items() if v}


class Placements:
    """The driver's side: each replica's placement group, made with it and removed with it."""

    def __init__(self, ranks: int, num_cpus: float, num_gpus: float) -> None:
        self.ranks, self.bundle = ranks, bundle(num_cpus, num_gpus)
        self.groups: dict = {}  # actor handle -> (its placement group, ``pg.ready()``)

    def start(self, make):
        """``make(**options)`` starts the actor with the given scheduling options: here, bundle 0
        of a new placement group (none when a replica asks for nothing and has one rank)."""
        if not self.bundle and self.ranks == 1:
            return make()
        pg = placement_group([self.bundle] * self.ranks, strategy="STRICT_PACK")
        handle = make(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
        self.groups[handle] = (pg, pg.ready())
        return handle

    def reserved(self, handle) -> bool:
        """Whether the replica's resources are set aside on a node (it is placed, maybe not yet
        started); asks Ray without waiting."""
        group = self.groups.get(handle)
        return group is None or bool(ray.wait([group[1]], timeout=0)[0])

    def end(self, handle) -> None:
        ray.kill(handle)
        group = self.groups.pop(handle, None)
        if group is not None:
            remove_placement_group(group[0])
