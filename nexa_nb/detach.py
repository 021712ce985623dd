"""The process a detached run trains in: ``python -m nexa_nb.detach RUN_DIR``.

``train(..., detach=True)`` checks and plans in the kernel as usual, saves the task by value
into the run's record (as ``%nexa_export`` saves one: ``torch.save`` with cloudpickle) and
starts this module in a session of its own (`runs.start_runner`). It loads the plan and the
task, deletes both files, and trains exactly as a kernel would: forked workers, the record
written by its drain thread. Restarting or shutting the kernel down leaves it going;
``%nexa_attach`` follows it from any kernel. ``%nexa_stop`` writes a request into the record,
and this process then interrupts itself as Ctrl-C interrupts a cell: the workers stop and the
last complete checkpoint is kept. A Slurm job (`nexa_nb.slurm`) runs this same module.

submitit's local executor does the same (a new session, the function pickled into a folder);
this needs nothing beyond what nexa_nb uses already.
"""

from __future__ import annotations

import pickle
import signal
import sys
from pathlib import Path

from nexa_nb import runs
from nexa_nb.api import run_recorded
from nexa_nb.errors import TrainingError
from nexa_nb.export import task_from_bytes


def main(folder: str) -> None:
    # A process started from one that ignores SIGINT would ignore it too: %nexa_stop needs it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    record_dir = Path(folder)
    plan = pickle.loads((record_dir / runs.DETACHED_PLAN).read_bytes())
    task = task_from_bytes((record_dir / runs.DETACHED_TASK).read_bytes())
    for name in (runs.DETACHED_PLAN, runs.DETACHED_TASK):
        (record_dir / name).unlink()
    runs.watch_for_stop(record_dir)
    try:
        run_recorded(plan, task, [], runs.RunWriter(record_dir, plan))
    except TrainingError as exc:  # the record holds the failure; the runner's log says it too
        raise SystemExit(f"training failed: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1])
