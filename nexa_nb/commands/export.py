"""``%nexa_export``: a script and its accelerate config that train the task outside the notebook."""

from __future__ import annotations

from nexa_nb.commands.errors import core_errors
from nexa_nb.flags import options_of
from nexa_nb.session import Session
from nexa_nb.task import Task


def run(session: Session, task: Task, task_var: str, args) -> None:
    from nexa_nb import export

    with core_errors():
        cfg = session.resolve(options_of(args), config_file=args.config)
        files = export.export_script(task, cfg, args.script, task_var=task_var)
    print(files.explanation)  # the files written, how the task travels, and the command to run
