"""``%nexa_train``: train a task in the cell."""

from __future__ import annotations

from nexa_nb.commands.errors import core_errors
from nexa_nb.flags import options_of
from nexa_nb.session import Session
from nexa_nb.task import Task


def run(session: Session, task: Task, args, *, dashboard: bool, refresh_interval: float):
    """The plan, the live view, the run; the `TrainResult` is the cell's value."""
    with core_errors():
        return session.train_in_cell(
            task, options_of(args), config_file=args.config, dashboard=dashboard, refresh_interval=refresh_interval
        )
