"""User-facing errors: one clear line on the terminal, no traceback, exit code 2."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def friendly():
    from .checkpoint import CheckpointError
    from .commit import FingerprintMismatch, LockHeld, OutputError
    from .config import ConfigError
    from .params import ParamsError
    from .shards import InputError
    from .spec import SpecError

    try:
        yield
    except (SpecError, CheckpointError, ConfigError, ParamsError, InputError, OutputError, FingerprintMismatch,
            LockHeld) as exc:
        print(f"illada-batch: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `illada-batch ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except KeyboardInterrupt:
        print("illada-batch: interrupted; committed shards are kept, a re-run resumes", file=sys.stderr)
        raise SystemExit(130) from None
