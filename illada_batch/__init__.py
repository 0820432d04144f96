"""illada-batch: distributed batch generation with masked-diffusion language models.

The top level is lazy: ``import illada_batch`` loads no torch, so the driver, ``validate``,
``render``, ``submit`` and ``status`` run on machines without it. The names below are
imported on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_model": "illada_batch.model.checkpoint",
    "save_checkpoint": "illada_batch.model.checkpoint",
    "generate": "illada_batch.decoding.loop",
    "SamplingParams": "illada_batch.decoding.params",
    "Engine": "illada_batch.engine.diffusion",
    "Request": "illada_batch.engine.requests",
    "Result": "illada_batch.engine.requests",
    "generate_dataset": "illada_batch.job.ray_data",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'illada_batch' has no attribute {name!r}")
