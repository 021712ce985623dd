"""Errors a user sees. Each message names the problem and the fix, in the user's words."""

from nexa_nb.config import ConfigError


class TrainingError(RuntimeError):
    """Training could not start or did not finish: bad data, a model without a loss, a failed rank."""

    def __init__(self, message: str, worker_traceback: str = ""):
        super().__init__(message)
        self.worker_traceback = worker_traceback
        """The failing worker's own traceback, when a worker failed (shown on request, not by default)."""


__all__ = ["ConfigError", "TrainingError"]
