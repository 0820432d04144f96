"""Shared fixtures: tiny random LLaDA models (float32, CPU); an S3 server and a local Ray per module."""

from __future__ import annotations

import math

import pytest
import torch

from illada_batch.model.configs.llada import LLaDAConfig
from illada_batch.model.llada import LLaDA

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=96,
            embedding_size=96, rope_theta=10000.0, max_sequence_length=256,
            mask_token_id=95, eos_token_id=1, pad_token_id=0)


# The engine tests' shape: d_model 64, vocab 256, 256 positions.
ENGINE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=256,
              embedding_size=256, rope_theta=10000.0, max_sequence_length=256, mask_token_id=2, eos_token_id=1,
              pad_token_id=1)


def tiny_llada(seed: int = 0, recipe: str = "scaled", eos_scale: float = 1.0, **overrides) -> LLaDA:
    """A tiny random LLaDA (float32, CPU) whose output depends on the context, not only on the
    token at a position; the mask token is never the argmax (its head row is zero) and argmax
    ties are impossible (head std 0.5). Norm weights are random too.

    ``recipe="scaled"`` (the sampler tests, ``TINY`` shape): block weights std 1/sqrt(fan_in),
    q/k twice that (sharp attention), a small mask-token embedding.
    ``recipe="sharp"`` (the engine tests, ``ENGINE`` shape): default init with the attention
    projections scaled 3x. ``eos_scale`` scales the EOS row of the head, so that some rows
    emit EOS early and others run to the full length."""
    torch.set_num_threads(1)
    cfg = LLaDAConfig(**{**(TINY if recipe == "scaled" else ENGINE), **overrides})
    torch.manual_seed(seed)
    model = LLaDA(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
            elif recipe == "scaled" and ".blocks." in name:  # [out, in]
                p.normal_(0.0, (2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
                          / math.sqrt(p.shape[1]))
            elif recipe == "sharp" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                      "attn_out.weight")):
                p.mul_(3.0)  # sharp, position-dependent attention: tokens depend on context
        if recipe == "scaled":
            model.model.transformer.wte.weight[cfg.mask_token_id].mul_(0.1)
        head = model.model.transformer.ff_out.weight
        head.normal_(0.0, 0.5)
        head[cfg.mask_token_id].zero_()
        head[cfg.eos_token_id] *= eos_scale
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_llada():
    """The one tiny-model factory: ``make(seed=0, recipe="scaled", eos_scale=1.0, **config)``
    (see ``tiny_llada``)."""
    return tiny_llada


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``family_checkpoint(name)``: the directory of the tiny random checkpoint of a family
    (``train/tiny_families.py``: its real config.json and tensor names, the shipped tiny
    tokenizer), written once per session."""
    from illada_batch.train.tiny_families import write_tiny

    made = {}

    def make(name: str):
        if name not in made:
            made[name] = write_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return make


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 with an empty ``bucket``."""
    from pipeline_support import S3Server

    server = S3Server().start()
    server.fs().mkdir("bucket")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the module's tests; yields its GCS address."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # address="local": always a new cluster; a bare init joins any cluster `ray start` left
        # on this machine (another test's, or a developer's) and then refuses num_cpus
        # Ray gives a raylet 30 s to register (not configurable); on a loaded machine a start
        # can miss that, so a start that timed out is shut down (nothing half-started is left
        # to the next module) and tried once more
        for attempt in (1, 2):
            try:
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
