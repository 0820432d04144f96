"""The opt-in timing of a tensor-parallel replica's collectives (``model/layers/comm.py``):
off, nothing is counted; on, every rank counts each collective it joined, with the bytes the
layers' shapes imply (2 ranks, gloo, tiny-llada, cache off)."""

from __future__ import annotations

import torch

from illada_batch.decoding.params import SamplingParams
from illada_batch.engine.diffusion import Engine
from illada_batch.engine.requests import Request
from illada_batch.model.layers.comm import COMM

PARAMS = SamplingParams(gen_length=16, steps=8, block_length=8, early_stop=False)


def _requests(prompts: list[list[int]]) -> list[Request]:
    return [Request(str(i), tuple(p), (), PARAMS) for i, p in enumerate(prompts)]


def test_each_rank_counts_its_collectives_only_when_timing_is_on(monkeypatch):
    monkeypatch.setenv("ILLADA_THREADS", "1")
    monkeypatch.setenv("ILLADA_COMM_TIMING", "1")  # rank 1 (a spawned process) reads it at import
    torch.set_num_threads(1)
    engine = Engine.from_pretrained("tiny-llada", cache="off", tensor_parallel_size=2, max_batch_size=4)
    try:
        monkeypatch.setattr(COMM, "on", False)
        engine.run(_requests([[5, 6, 7]]))
        assert COMM.take() == {}, "off: rank 0 counts nothing"
        engine.peers.report(engine)  # every tally of that run, dropped

        monkeypatch.setattr(COMM, "on", True)
        before = engine.counters.forward_passes, engine.counters.query_tokens
        engine.run(_requests([[5, 6, 7], [8, 9, 10, 11, 12], [13]]))
        forwards = engine.counters.forward_passes - before[0]
        queries = engine.counters.query_tokens - before[1]
        rank0, rank1 = (r["comm"] for r in engine.peers.report(engine))
    finally:
        engine.close()
    card, d = engine.model.card, engine.model.config.d_model
    per_forward = 2 * card.n_layers + 1  # attention out + MLP down per layer, the embedding
    for tally in (rank0, rank1):
        assert tally["all_reduce"]["calls"] == per_forward * forwards
        assert tally["all_reduce"]["bytes"] == per_forward * queries * d * 4  # float32 [B, L, d]
        assert tally["all_gather"]["calls"] == forwards  # the logits, once a step
        assert tally["agree"]["calls"] == 1
    assert rank0["all_gather"] == {**rank1["all_gather"], "seconds": rank0["all_gather"]["seconds"]}
    assert rank0["broadcast"]["calls"] == 1 and rank0["broadcast"]["bytes"] > 0  # the requests, sent by rank 0
    assert "broadcast" not in rank1  # a serving rank's wait for requests is idle time, not counted
