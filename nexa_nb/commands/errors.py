"""The core's errors as the one UsageError line a magic shows."""

from __future__ import annotations

from contextlib import contextmanager

from IPython.core.error import UsageError

from nexa_nb.config import ConfigError
from nexa_nb.errors import TrainingError
from nexa_nb.text import one_line


@contextmanager
def core_errors(*more):
    """ConfigError and TrainingError (and the error types in `more`) as one UsageError line.

    A worker's traceback is not printed: ``%nexa_status --traceback`` shows it.
    """
    try:
        yield
    except (ConfigError, TrainingError, *more) as exc:
        message = one_line(exc)
        if getattr(exc, "worker_traceback", ""):
            message += " (the worker's traceback: %nexa_status --traceback)"
        raise UsageError(message) from None
