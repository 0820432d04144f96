"""illada-batch: distributed batch generation with masked-diffusion language models."""

from .checkpoint import load_model, save_checkpoint
from .decode import generate
from .params import SamplingParams

__all__ = ["load_model", "save_checkpoint", "generate", "SamplingParams", "Engine"]


def __getattr__(name: str):
    if name == "Engine":  # imported lazily: the engine pulls in the cache
        from .engine import Engine

        return Engine
    raise AttributeError(name)
