"""A tensor-parallel replica on Ray: N ranks in one placement group (``STRICT_PACK``: one
node), one device each (``resources`` is per rank).

The driver places each replica as a placement group of N bundles (``placements.py``) and the
replica actor, its one handle, in bundle 0: Ray reports the actor ready only once the whole
group is placed, so a cluster with no node of N free devices (or CPUs) is reported as
unplaceable by the pool's placement timeout, as for one device. The replica actor is rank 0:
when it builds its engine (``start_ranks``) it starts ranks 1..N-1 as ``Rank`` actors in
bundles 1..N-1, which join its torch.distributed group and serve (``engine/tensor_parallel``).

Faults. The ranks are actors the replica owns, so they die with it. A rank that dies breaks
the group: rank 0's next collective fails, rank 0 sees the rank gone and exits, so the
replica dies and the driver replaces the whole replica (a new placement group, N new
ranks); the shards in flight go back to the queue, as for any replica that dies.
"""

from __future__ import annotations

import os

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(max_restarts=0, max_task_retries=0)
class Rank:
    """Ranks 1..N-1 of a replica: its shard of the model, serving rank 0 until told to stop."""

    def serve(self, path: str, rank: int, size: int, init: str, dtype, engine_kwargs: dict) -> None:
        from illada_batch.engine.tensor_parallel import rank_engine, serve

        serve(rank_engine(path, rank, size, init, None, dtype, engine_kwargs))


class RayPeers:
    """Rank 0's view of the other ranks (``tensor_parallel.Peers``, with a death check)."""

    def __init__(self, peers, serving: list) -> None:
        self.peers, self.serving = peers, serving

    def send(self, requests) -> None:
        self.peers.send(requests)

    def broken(self, exc: BaseException) -> None:
        """After a failed run: when a rank is gone, the replica goes down with it."""
        done, _ = ray.wait(self.serving, num_returns=1, timeout=5)
        if done:
            print(f"tensor-parallel rank gone ({type(exc).__name__}: {exc}); the replica exits", flush=True)
            os._exit(1)

    def close(self) -> None:
        self.peers.close()


def start_ranks(path: str, size: int, num_cpus: float, num_gpus: float, dtype, engine_kwargs: dict):
    """Rank 0's engine here, ranks 1..N-1 as ``Rank`` actors in this replica's placement group."""
    from illada_batch.engine.tensor_parallel import Peers, free_address, rank_engine

    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise RuntimeError("a tensor-parallel replica runs in the placement group the driver made for it")
    init = free_address()  # this node: STRICT_PACK puts every rank here
    env = {"env_vars": {"ILLADA_THREADS": str(max(1, int(num_cpus)))}}
    ranks = [Rank.options(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=env,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))
             .remote() for r in range(1, size)]
    serving = [w.serve.remote(path, r, size, init, dtype, engine_kwargs) for r, w in enumerate(ranks, 1)]
    engine = rank_engine(path, 0, size, init, None, dtype, engine_kwargs)
    engine.peers = RayPeers(Peers(size), serving)
    engine._ranks = ranks  # the actors live as long as the engine
    return engine
