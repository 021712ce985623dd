"""Errors a user sees. Each message names the problem and the fix, in the user's words."""

from __future__ import annotations

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


__all__ = ["ConfigError", "TrainingError"]
