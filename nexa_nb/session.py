"""What a notebook's nexa_nb session holds between cells, and training inside a cell.

`Session` keeps what ``%nexa_config`` (or the form's "Apply as defaults") set, the last
result and the last failure. `Session.train_in_cell` is the one way a cell trains: print
the plan, show the live view once every check passed, train, then leave the static picture;
the ``%nexa_train`` magic and the form's Train button both call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from nexa_nb.config import TrainConfig, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.events import RunStarted
from nexa_nb.task import Task


def find_task(namespace: Mapping[str, Any], name: str) -> Task:
    """The `nexa_nb.Task` held by the notebook variable `name`, or a UsageError naming the fix."""
    if name not in namespace:
        raise UsageError(
            f"there is no variable {name!r} in this notebook. Fix: define it, e.g. "
            f"{name} = nexa_nb.Task(model, train_data), or pass the name of your task."
        )
    task = namespace[name]
    if not isinstance(task, Task):
        raise UsageError(
            f"{name!r} is a {type(task).__name__}, not a nexa_nb.Task. Fix: wrap your model "
            f"and data: {name} = nexa_nb.Task(model, train_data)."
        )
    return task


class PlanNotesShown:
    """Console output for a run whose plan was printed already: its notes are not repeated."""

    def __init__(self, sink):
        self.sink = sink

    def handle(self, event) -> None:
        self.sink.handle(replace(event, notes=()) if isinstance(event, RunStarted) else event)

    def close(self) -> None:
        self.sink.close()


class ShownAtFirstEvent:
    """A live view displayed when the first event reaches it, if the plan has not shown it yet:
    the notes of a --batch-size auto search come while the run is still being planned."""

    def __init__(self, sink, show):
        self.sink = sink
        self.show = show

    def handle(self, event) -> None:
        self.show()
        self.sink.handle(event)

    def close(self) -> None:
        self.sink.close()


def follow_detached(run, dashboard) -> None:
    """The cell of a detached run returns at once, saying where it trains and how to follow it; its
    dashboard, if any, follows the record from a thread (the run's own process never talks to this kernel)."""
    import threading

    from nexa_nb import runs

    where = f"Slurm job {run.job}" if run.job else f"process {run.pid}"
    print(f"detached: {run.name} trains in {where}; follow it with %nexa_attach {run.name}")
    if dashboard is not None:

        def follow() -> None:
            try:
                runs.follow(runs.Run(run.run_dir), [dashboard])
            except TrainingError:  # the runner is gone: the dashboard shows it
                pass

        threading.Thread(target=follow, name="nexa-follow", daemon=True).start()


@dataclass
class Session:
    """A notebook's defaults and its last outcome."""

    defaults: dict[str, Any] = field(default_factory=dict)
    """`TrainConfig` fields set by %nexa_config: the "session" layer of the configuration."""
    config_file: str | None = None
    """The config file given to %nexa_config, used when a run names none."""
    last_error: TrainingError | None = None
    """The failure of the last run in a cell, when a worker failed (its traceback included)."""
    last_result: Any = None
    """The `TrainResult` of the last run in a cell."""

    def resolve(self, options: Mapping[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
        """The configuration a run would use: the defaults set so far, then `options`."""
        return resolve_config(
            config_file=config_file or self.config_file, session=self.defaults, arguments=options or {}
        )

    def set_defaults(
        self, options: Mapping[str, Any], *, config_file: str | None = None, reset: bool = False
    ) -> TrainConfig:
        """Merge `options` into the defaults (all of them forgotten first with `reset`).

        The new defaults are resolved before anything changes: a bad combination raises
        `ConfigError` and leaves the session as it was.
        """
        defaults = {} if reset else dict(self.defaults)
        defaults.update(options)
        file = config_file or (None if reset else self.config_file)
        config = resolve_config(config_file=file, session=defaults)
        self.defaults, self.config_file = defaults, file
        return config

    def train_in_cell(
        self,
        task: Task,
        options: Mapping[str, Any],
        *,
        config_file: str | None = None,
        dashboard: bool = True,
        refresh_interval: float = 0.25,
        output=None,
        print_plan: bool = True,
    ):
        """Train `task` with `options` over the defaults, showing the run in the current cell.

        Once the task and the options passed every check, the plan is printed (`print_plan`)
        and the live dashboard shown (console lines without `dashboard`); a --batch-size auto
        search shows the dashboard as soon as it says the first size it tried. After the run the
        dashboard becomes its static picture. `output`, an ipywidgets Output the caller
        displays into, is cleared before that picture is drawn: an Output widget ignores the
        display update that would otherwise replace the live widget in place. Raises
        `ConfigError` or `TrainingError`; a worker's failure is kept in `last_error`.
        """
        from nexa_nb import api

        self.last_error = None
        if dashboard:
            from nexa_nb.sinks.dashboard import Dashboard

            sink = Dashboard(refresh_interval=refresh_interval)
        else:
            from nexa_nb.sinks.console import ConsoleSink

            sink = PlanNotesShown(ConsoleSink())
        shown = False

        def show_dashboard() -> None:
            nonlocal shown
            if shown:
                return
            if output is not None:
                display(sink.widget)
            else:
                sink.show()
            shown = True

        def show(plan) -> None:
            if print_plan:
                print(plan.describe())
            if dashboard:
                show_dashboard()

        detached = None
        try:
            result = api.train(
                task,
                config=config_file or self.config_file,
                session=self.defaults,
                sinks=[ShownAtFirstEvent(sink, show_dashboard) if dashboard else sink],
                on_plan=show,
                **options,
            )
            if isinstance(result, api.DetachedRun):
                detached = result
                follow_detached(result, sink if dashboard else None)
                return result
            self.last_result = result
            return result
        except TrainingError as exc:
            if exc.worker_traceback:
                self.last_error = exc
            raise
        finally:
            if shown and dashboard and detached is None:
                if output is not None:
                    output.clear_output()
                sink.finalize()
