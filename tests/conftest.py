"""Shared fixtures: tiny random LLaDA models (float32, CPU); an S3 server and a local Ray per module."""

from __future__ import annotations

import math

import pytest
import torch

from illada_batch.model.config import LLaDAConfig
from illada_batch.model.llada import LLaDA

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=96,
            embedding_size=96, rope_theta=10000.0, max_sequence_length=256,
            mask_token_id=95, eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="session")
def make_tiny_llada():
    """``make(seed=0, **config overrides) -> LLaDA`` with every parameter random (norms too).

    Scaled so the output depends on the context, not only on the token at a position:
    block weights std 1/sqrt(fan_in) (q/k twice that: sharp attention), a small mask-token
    embedding, an output head with std 0.5 (argmax ties impossible) whose mask-token row is
    zero (the mask token is never the argmax)."""

    def make(seed: int = 0, **overrides) -> LLaDA:
        torch.set_num_threads(1)
        cfg = LLaDAConfig(**{**TINY, **overrides})
        torch.manual_seed(seed)
        model = LLaDA(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                    p.uniform_(0.5, 1.5)
                elif ".blocks." in name:  # [out, in]
                    p.normal_(0.0, (2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
                              / math.sqrt(p.shape[1]))
            model.model.transformer.wte.weight[cfg.mask_token_id].mul_(0.1)
            head = model.model.transformer.ff_out.weight
            head.normal_(0.0, 0.5)
            head[cfg.mask_token_id].zero_()
        return model.eval()

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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
