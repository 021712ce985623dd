"""Helpers shared by the tutorial notebooks 00, 04 and 05.

- `log_worker_output`: keep what the worker processes print out of the notebook's cells.
- `InterruptAt`: a sink that interrupts the kernel at a given step, as the stop button does.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

_log_path: str | None = None
_hook_installed = False


def _forked_by_nexa_nb() -> bool:
    """In a forked child: whether the fork happened inside `nexa_nb.launch` (a worker process).

    The child's Python stack is a copy of the forking thread's, so it still shows who forked.
    """
    frame = sys._getframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "nexa_nb.launch":
            return True
        frame = frame.f_back
    return False


def _to_log_in_child() -> None:
    """After a fork, in a worker process: fds 1 and 2, and sys.stdout/sys.stderr, go to the log."""
    if _log_path is None or not _forked_by_nexa_nb():
        return
    fd = os.open(_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def log_worker_output(path: str | os.PathLike | None = None) -> str:
    """Send what nexa_nb's worker processes print to a log file; return its path.

    nexa_nb forks its worker processes from the kernel, and in a Jupyter kernel a forked
    process prints into the cell that is running: library start-up messages from each
    worker (DeepSpeed's op checks and builds, deprecation warnings) would sit between the
    outputs of the cell. Training progress does not travel that way (it comes as events, to
    the dashboard), and neither do errors (a failing worker's traceback is kept for
    ``%nexa_status --traceback``). After this call, the worker processes that nexa_nb forks
    from the kernel (and the programs they start, such as the compiler DeepSpeed runs) write
    to `path` instead (default: ``nexa_nb-workers.log`` in the temporary folder). The kernel's
    own output, and commands run with ``!`` or `subprocess`, are not affected.
    """
    global _log_path, _hook_installed
    _log_path = (
        os.path.abspath(path) if path is not None else os.path.join(tempfile.gettempdir(), "nexa_nb-workers.log")
    )
    if not _hook_installed:
        os.register_at_fork(after_in_child=_to_log_in_child)
        _hook_installed = True
    return _log_path


def stop_logging_worker_output() -> None:
    """Let the worker processes print into the cells again (for runs started after this call)."""
    global _log_path
    _log_path = None


class InterruptAt:
    """A sink that interrupts the kernel once rank 0 has finished optimizer step `step`.

    It sends SIGINT to the kernel's own process, which is what Jupyter's stop button does;
    nexa_nb then stops every worker and returns a result with status "interrupted". Sinks run
    in the kernel thread that receives the workers' events, while the cell's code waits in
    `nexa_nb.train`; the signal interrupts that wait, as a click on the stop button would.
    """

    def __init__(self, step: int):
        self.step = step
        self.sent = False

    def handle(self, event) -> None:
        from nexa_nb.events import StepEnd

        if isinstance(event, StepEnd) and event.rank == 0 and event.step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)

    def close(self) -> None:
        pass
