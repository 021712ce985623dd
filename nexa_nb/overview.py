"""Runs seen from their records: the table of runs, and several runs' losses on one chart.

Everything here reads `nexa_nb.runs` records only, so it works from any kernel, another
notebook, or after a restart: ``%nexa_runs`` and ``%nexa_runs --compare``, and their Python
equivalents `runs_table` and `compare_svg`. Following one run is `nexa_nb.api.attach`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from nexa_nb import events as ev
from nexa_nb import runs, text
from nexa_nb.errors import TrainingError


def run_row(run: runs.Run) -> tuple[str, ...]:
    """Name, status, step / total, last loss, started, where it runs."""
    info = run.info()
    step = total = 0
    loss = None
    for event in run.events():
        if isinstance(event, ev.RunStarted):
            total, step = event.total_steps, event.start_step
        elif isinstance(event, ev.StepEnd) and event.rank == 0:
            step, loss = event.step, event.loss if event.mean_loss is None else event.mean_loss
        elif isinstance(event, ev.RunEnded):
            step = event.step
    where = info["where"] if info["where"] != "kernel" else f"kernel (pid {info['pid']})"
    return (
        run.name,
        run.status(),
        f"{step}/{total}",
        "n/a" if loss is None else f"{loss:.4f}",
        info["started"].replace("+00:00", "Z"),
        where,
    )


def runs_table(root: str | os.PathLike = runs.RUNS_ROOT) -> str:
    """The runs recorded under `root` as a text table, oldest first."""
    rows = [run_row(run) for run in runs.list_runs(root)]
    if not rows:
        return f"no runs recorded in {root}/"
    return text.table(rows, ("run", "status", "step", "loss", "started (UTC)", "where"))


def compare_svg(names: Iterable[str], root: str | os.PathLike = runs.RUNS_ROOT) -> str:
    """The loss curves (rank 0, averaged over ranks) of several runs on one chart, evals as dots."""
    from nexa_nb.sinks.render import PALETTE, Curve, Series, line_chart

    curves = []
    low, high = None, 0
    for i, name in enumerate(names):
        run = runs.find_run(name, root)
        events = run.events()
        loss, evals = Series(), Series()
        for step, value in runs.iter_step_losses(events):
            loss.append(step, value)
        for event in events:
            if isinstance(event, ev.EvalEnd) and "eval_loss" in event.metrics:
                evals.append(event.step, event.metrics["eval_loss"])
        color = PALETTE[i % len(PALETTE)]
        curves.append(Curve(loss, "nexa-compare-loss", color, run.name, data=(("run", run.name),)))
        if len(evals):
            curves.append(Curve(evals, "nexa-compare-eval", color, "", data=(("run", run.name),), dots=True))
        if len(loss):
            low = loss.xs[0] if low is None else min(low, loss.xs[0])
            high = max(high, loss.xs[-1])
    if len(curves) < 1:
        raise TrainingError("name at least one run to compare; list them with %nexa_runs")
    return line_chart(
        curves, title="loss", x_range=(low or 0, high), css_class="nexa-compare", ink="#222", background="white"
    )
