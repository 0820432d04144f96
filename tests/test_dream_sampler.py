"""Dream's sampler settings and schedule (``decoding/dream_sampler.py``), without a model:
the timestep schedule's reference quirk, the settings' one definition, their refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from illada_batch.cli import build_parser
from illada_batch.decoding.dream_sampler import dream_transfer, fill_count
from illada_batch.decoding.params import Alg, ParamsError, SamplingParams
from illada_batch.job.spec import load_spec, spec_from_dict


def schedule(masked: int, steps: int) -> list[int]:
    """Tokens filled at each step when every step fills its count."""
    out = []
    for i in range(steps):
        n = int(fill_count(torch.tensor([masked]), torch.tensor([i]), steps))
        out.append(n)
        masked -= n
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 512))
def test_steps_equal_to_tokens_fill_nothing_first_and_two_last(n):
    """The reference's quirk, followed: int(n * (1 - s/t)) is int(1 - eps) = 0 at the first step."""
    got = schedule(n, n)
    assert got[0] == 0 and got[-1] == 2 and sum(got) == n


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 64))
def test_the_schedule_fills_everything_by_its_last_step(masked, steps):
    got = schedule(masked, steps)
    assert sum(got) == masked and all(n >= 0 for n in got)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31), st.sampled_from(list(Alg)), st.sampled_from([None, 0.5]))
def test_a_step_fills_masked_positions_only(k, seed, alg, alg_temp):
    g = torch.Generator().manual_seed(seed)
    is_mask = torch.rand(1, k, generator=g) < 0.6
    conf = torch.where(is_mask, torch.rand(1, k, generator=g), -torch.inf)
    out = dream_transfer(conf, is_mask, torch.tensor([0]), 4, alg, alg_temp if alg is not Alg.ORIGIN else None, [g])
    assert not bool((out & ~is_mask).any())


def test_dream_settings_are_checked_where_they_are_defined():
    with pytest.raises(ParamsError, match="alg: 'greedy' is not one of origin, maskgit_plus"):
        SamplingParams(alg="greedy")
    with pytest.raises(ParamsError, match="alg_temp: needs alg"):
        SamplingParams(alg_temp=0.5)
    with pytest.raises(ParamsError, match="threshold: alg=entropy sets its own schedule"):
        SamplingParams(alg="entropy", threshold=0.9)
    with pytest.raises(ParamsError, match="remasking: alg=origin chooses the positions itself"):
        SamplingParams(alg="origin", remasking="random")
    assert SamplingParams(alg="topk_margin").alg is Alg.TOPK_MARGIN


def test_the_cli_and_the_spec_take_alg_from_sampling_params():
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--alg", "entropy",
                                      "--alg-temp", "0.2"])
    assert (args.alg, args.alg_temp) == ("entropy", 0.2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--alg", "greedy"])
    spec = load_spec("jobs/demo.yaml").model_dump(mode="json")
    spec["sampling"]["alg_temp"] = 0.5
    with pytest.raises(Exception, match="sampling.*alg_temp: needs alg"):
        spec_from_dict(spec)


def test_unset_dream_settings_leave_older_fingerprints_alone():
    """A setting left unset is not in the fingerprint, so outputs written before it existed
    still resume. The shipped specs' fingerprints are pinned: changing them makes every
    existing output of those specs refuse to resume, which must be deliberate (it was once,
    when engine.cache joined the fingerprint)."""
    assert load_spec("jobs/demo.yaml").fingerprint() == "e598aa1a6acc1e37"
    assert load_spec("jobs/nightly.yaml").fingerprint() == "91f9da025399758c"
    spec = load_spec("jobs/demo.yaml").model_dump(mode="json")
    spec["sampling"]["alg"] = "entropy"
    assert spec_from_dict(spec, base_dir="jobs").fingerprint() != "e598aa1a6acc1e37"
