"""A tensor-parallel replica's ranks: how N processes become one engine.

Design note. Rank 0 holds the ``Engine`` its caller talks to; ranks 1..N-1 each hold an
``Engine`` over their own shard of the model (``load_model(tp=...)``) and serve: at every
``Engine.run`` rank 0 broadcasts the requests, and every rank runs the same schedule over
them (SGLang's shape: the schedule is a pure function of the requests, so every rank's page
pool hands out the same page ids and page tables are shared without sending them). Every
forward is collective (``model/layers/linear.py``: one all-reduce after each row-parallel
layer, one all-gather of the logits at the positions the sampler reads), so every rank
gets the same bytes of logits and makes the same token choices; at the end of each run
every rank's results are compared with rank 0's (a digest), and a rank that disagrees
raises on rank 0 rather than letting a replica write tokens its ranks do not agree on.
Rank 0's results are the replica's.

The group is torch.distributed's default process group (gloo on CPU, NCCL on GPU), one per
process. ``start_local`` forms it from local processes (``Engine.from_pretrained(...,
tensor_parallel_size=N)``); the job forms it from Ray workers in a placement group
(``job/tp_ranks.py``) with the same ``serve``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from illada_batch.engine.rank_memory import memory, reset_peak
from illada_batch.engine.requests import Request, Result
from illada_batch.model.checkpoint import load_model
from illada_batch.model.layers.comm import COMM
from illada_batch.model.layers.linear import TPGroup

REPORT = "rank report"  # rank 0 asks every rank for its report (``rank_report``)


def free_address() -> str:
    """``tcp://127.0.0.1:port`` on a port free now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def join_group(rank: int, size: int, init_method: str, device: str | None) -> torch.device:
    """This process joins the TP group; -> its device (``cuda:<rank>`` on a multi-GPU host,
    ``cuda`` where it sees one GPU, else cpu)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        dev = torch.device("cuda", rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=size)
    return dev


def digest(results: Sequence[Result]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for r in results:
        h.update(repr((r.request_id, r.sample_index, r.token_ids, r.finish_reason)).encode())
    return h.hexdigest()


def agree(results: Sequence[Result]) -> None:
    """Every rank's results of one run against rank 0's; raises on rank 0 when one differs."""
    mine = digest(results)
    every: list[Any] = [None] * dist.get_world_size()
    if COMM.on:
        COMM.timed("agree", len(mine) * len(every), lambda: dist.all_gather_object(every, mine))
    else:
        dist.all_gather_object(every, mine)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd and dist.get_rank() == 0:
        raise RuntimeError(f"tensor-parallel ranks {odd} chose other tokens than rank 0: the replica's ranks disagree")


class Peers:
    """Rank 0's side of the group: sends each run's requests, checks the results, closes."""

    def __init__(self, size: int, processes: Sequence[Any] = ()) -> None:
        self.size, self.processes = size, list(processes)

    def send(self, requests: list[Request]) -> None:
        if COMM.on:  # the pickled requests' bytes (pickled once more, only when timing)
            COMM.timed("broadcast", len(pickle.dumps(requests)), lambda: dist.broadcast_object_list([requests], src=0))
        else:
            dist.broadcast_object_list([requests], src=0)

    def report(self, engine) -> list[dict]:
        """Every rank's ``rank_report`` (rank 0's from ``engine``), rank 0 first."""
        dist.broadcast_object_list([REPORT], src=0)
        every: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(rank_report(engine), every, dst=0)
        return every

    def close(self) -> None:
        if dist.is_initialized():
            dist.broadcast_object_list([None], src=0)
            dist.destroy_process_group()
        for p in self.processes:
            p.join(timeout=30)


def rank_report(engine) -> dict:
    """This rank's collectives since the last report (``layers/comm.py``, when timing is on),
    its memory now and at its peak since the last report (then the peak is reset), and its
    memory before and after it loaded its weights."""
    out = {"comm": COMM.take(), "memory": memory(), "load": getattr(engine, "load_memory", {})}
    reset_peak()
    return out


def serve(engine) -> None:
    """Ranks 1..N-1: run what rank 0 sends until it sends None."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        if box[0] == REPORT:
            dist.gather_object(rank_report(engine), None, dst=0)
            continue
        try:
            results = engine.run(box[0])
        except Exception:  # noqa: BLE001 - rank 0 runs the same requests and reports the same error
            continue
        agree(results)
    dist.destroy_process_group()


def _threads() -> None:
    if "ILLADA_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["ILLADA_THREADS"]))


def rank_engine(path: str, rank: int, size: int, init_method: str, device: str | None, dtype, engine_kwargs: dict):
    """Join the group and build this rank's engine over its shard of the model."""
    from illada_batch.engine.diffusion import Engine

    _threads()
    dev = join_group(rank, size, init_method, device)
    before = memory()
    model = load_model(path, device=dev, dtype=dtype, tp=TPGroup(rank, size))
    engine = Engine(model, tensor_parallel_size=size, **engine_kwargs)
    engine.load_memory = {"before": before, "after": memory()}
    return engine


def _local_rank(path, rank, size, init_method, device, dtype, engine_kwargs) -> None:
    serve(rank_engine(path, rank, size, init_method, device, dtype, engine_kwargs))


def start_local(path: str, size: int, device: str | None, dtype, engine_kwargs: dict):
    """Rank 0's engine here, ranks 1..N-1 in local processes (spawned: no fork of torch state)."""
    init = free_address()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_local_rank, args=(str(path), r, size, init, device, dtype, engine_kwargs), daemon=True)
             for r in range(1, size)]
    for p in procs:
        p.start()
    engine = rank_engine(str(path), 0, size, init, device, dtype, engine_kwargs)
    engine.peers = Peers(size, procs)
    return engine
