"""``%nexa_runs``, ``%nexa_attach`` and ``%nexa_stop``: the recorded runs, one run drawn from its
record, and stopping a detached run."""

from __future__ import annotations

from IPython.display import display

from nexa_nb.commands.errors import core_errors


def table(args) -> None:
    """The table of runs, or with ``--compare`` their loss curves on one picture."""
    from nexa_nb import overview

    with core_errors():
        if args.compare:
            svg = overview.compare_svg(args.compare, root=args.root)
            display({"image/svg+xml": svg, "text/plain": f"loss of {', '.join(args.compare)}"}, raw=True)
        else:
            print(overview.runs_table(args.root))


def live_sink(dashboard: bool, refresh_interval: float):
    """The dashboard, shown in this cell (or console lines): what a run is drawn into."""
    if not dashboard:
        from nexa_nb.sinks.console import ConsoleSink

        return ConsoleSink()
    from nexa_nb.sinks.dashboard import Dashboard

    sink = Dashboard(refresh_interval=refresh_interval)
    sink.show()
    return sink


def follow(args, *, dashboard: bool, refresh_interval: float):
    """Draw run `args.run` from its record, live until it ends; its `TrainResult` is the cell's value.

    An interrupt stops following, not the run.
    """
    from nexa_nb import api, runs

    with core_errors():
        runs.find_run(args.run, args.root)  # a missing run is one line, before any display
    sink = live_sink(dashboard, refresh_interval)
    try:
        with core_errors():
            return api.attach(args.run, [sink], root=args.root)
    except KeyboardInterrupt:
        print(f"stopped following {args.run}; the run itself goes on (%nexa_attach {args.run} to follow it again)")
    finally:
        if dashboard:
            sink.finalize()


def stop(args) -> None:
    from nexa_nb import runs

    with core_errors():
        print(runs.stop(args.run, args.root))
