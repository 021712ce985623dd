"""Errors a user sees. Each message names the problem and the fix, in the user's words."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from nexa_nb.config import ConfigError


class TrainingError(RuntimeError):
    """Training could not start or did not finish: bad data, a model without a loss, a failed rank."""

    def __init__(self, message: str, worker_traceback: str = "", worker_error: str = "", rank: int | None = None):
        super().__init__(message)
        self.worker_traceback = worker_traceback
        """The failing worker's own traceback, when a worker failed (shown on request, not by default)."""
        self.worker_error = worker_error
        """The exception type a worker raised (e.g. "OutOfMemoryError"), when a worker failed."""
        self.rank = rank


@contextmanager
def logger_silenced(name: str) -> Iterator[None]:
    """Silence the library logger `name` (all but CRITICAL) while the block runs: for libraries
    that log, in the kernel, an error that nexa_nb reports itself in one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


__all__ = ["ConfigError", "TrainingError"]
