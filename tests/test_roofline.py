"""``bench --roofline``: a sample of each run's steps (its first block) stands for the whole
run, so the table takes minutes on a CPU; the prediction must equal the whole run's."""

from __future__ import annotations

import pytest

from illada_batch.bench.roofline import DEVICES, predict, schedule
from illada_batch.model.configs.llada import PRESETS

KEYS = ["steps", "seconds", "flops", "weights", "kv_read", "kv_written", "copied", "compute_bound_steps"]


@pytest.mark.parametrize("cache,paged", [("blocks", True), ("blocks", False),
                                         ("prefix+blocks", True)])  # once: the prefix encoded
def test_the_sampled_schedule_predicts_the_whole_run(cache, paged):
    cfg, device = PRESETS["llada-8b"], DEVICES["h100"]
    whole = predict(**_args(schedule(cache, 2, paged=paged, blocks=None)), cfg=cfg, device=device)
    sampled_traffic, once, repeat = schedule(cache, 2, paged=paged)
    assert repeat > 1 and len(sampled_traffic.steps) < whole["steps"]
    sampled = predict(sampled_traffic, cfg, device, 512, once, repeat)
    for key in KEYS:
        assert sampled[key] == pytest.approx(whole[key], rel=1e-9), key


def _args(run):
    traffic, once, repeat = run
    return dict(traffic=traffic, tokens=512, once=once, repeat=repeat)
