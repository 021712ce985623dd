"""Live training dashboard on ipywidgets 8 (JupyterLab 4, Notebook 7), fed only by events.

It never looks at torch or the GPU: everything it shows arrives in events, so a recorded
stream replays into it in a test.

Charts are SVG strings made in pure Python (`nexa_nb.sinks.render`) inside `widgets.HTML`.
Chosen over matplotlib (a PNG re-encoded per frame, or the ipympl extension) and over
plotting widgets such as bqplot or plotly (another dependency and frontend extension, and
their state is gone when the notebook is saved without it) because:
  - a redraw is one string trait change, cheap enough for several per second;
  - it needs no frontend extension beyond the standard widgets;
  - the same SVG is the static `image/svg+xml` picture that GitHub, nbviewer and nbconvert
    show where widget state is unavailable;
  - its elements carry `class` and `data-*` attributes a browser test can query.

Threads. `handle` runs on the thread that drains the event queue: it records the event
(O(1)) and wakes a render thread that redraws at most once per `refresh_interval`.
`RunEnded` and `close` redraw once more at once, so the final state is always on screen.

Contract with the code that runs training (on the kernel's main thread)::

    dashboard = Dashboard()
    dashboard.show()       # before training: the live widget appears in this cell
    ...                    # the drain thread calls handle(event) ..., then close()
    dashboard.finalize()   # after the run ends

`finalize` replaces the live widget with a static picture (SVG of curves and memory) and
adds a one-paragraph summary, then closes the widgets, so the saved notebook shows the
result and holds no dangling widget. It must run on the main thread: output displayed from
another thread goes to whichever cell is executing at that moment.
"""

from __future__ import annotations

import threading
import time
from html import escape

import ipywidgets as widgets
from IPython.display import display
from traitlets import Dict, HasTraits, Int, List, Unicode

from nexa_nb.events import RunEnded, Sink, StepEnd
from nexa_nb.sinks.render import (
    RunRecord,
    fmt_duration,
    fmt_metrics,
    loss_chart,
    memory_chart,
    plan_parts,
    run_speed,
    run_svg,
    scalar_charts,
    status_text,
    summary_text,
)

NOTES_SHOWN = 5  # the latest notes; a run that retries a lot should not push the charts away
BAR_STYLES = {"running": "info", "completed": "success", "failed": "danger", "interrupted": "warning"}


class Dashboard(Sink, HasTraits):
    """A sink that draws a run live.

    The traits mirror what is on screen after the last redraw. The widgets are attributes:
    `widget` (the box `show` displays), `progress` and `accumulation` (IntProgress), and
    HTML views `header_view`, `progress_view`, `accumulation_view`, `loss_view`,
    `scalars_view`, `memory_view`, `status_view`, whose elements carry `class` and
    `data-*` attributes (`.nexa-progress[data-step][data-total]`,
    `polyline.nexa-loss[data-rank][data-points]`, `.nexa-memory-row[data-rank]`,
    `.nexa-status[data-status]`, `.nexa-plan[data-zero]`, ...).
    """

    render_count = Int(0, help="Redraws so far; the throttle keeps this small.")
    step = Int(0, help="Step shown by the progress bar.")
    total = Int(0, help="Total steps shown by the progress bar.")
    status = Unicode("", help='Status line, e.g. "running: step 5/20", "interrupted at step 7".')
    points_per_rank = Dict(help="rank -> number of train-loss points in the chart.")
    memory_ranks = List(help="Ranks with a row in the memory display.")

    def __init__(self, refresh_interval: float = 0.25, clock=time.monotonic):
        """`refresh_interval`: seconds between redraws (0.25: smooth to the eye, a few
        small messages per second to the browser). `clock` times steps for the ETA."""
        super().__init__()
        self.refresh_interval = refresh_interval
        self.record = RunRecord()
        self._clock = clock
        self._timing: tuple[int, float, int, float] | None = None  # rank 0: first step, time, last step, time
        self._lock = threading.RLock()
        self._dirty = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._display = None
        self._finalized = False

        self.header_view = widgets.HTML()
        self.progress = widgets.IntProgress(min=0, max=1, layout=widgets.Layout(width="100%"))
        self.progress_view = widgets.HTML()
        self.accumulation = widgets.IntProgress(
            min=0, max=1, description="accumulation", style={"description_width": "initial"}
        )
        self.accumulation_view = widgets.HTML()
        self._accumulation_row = widgets.HBox(
            [self.accumulation, self.accumulation_view], layout=widgets.Layout(display="none")
        )
        self.loss_view = widgets.HTML()
        self.scalars_view = widgets.HTML()
        self.memory_view = widgets.HTML()
        self.status_view = widgets.HTML()
        self.widget = widgets.VBox(
            [
                self.header_view,
                self.progress,
                self.progress_view,
                self._accumulation_row,
                self.loss_view,
                self.scalars_view,
                self.memory_view,
                self.status_view,
            ]
        )
        self.flush()

    # --- sink ------------------------------------------------------------------------

    def handle(self, event) -> None:
        with self._lock:
            self.record.handle(event)
        super().handle(event)
        if self._stopped.is_set():  # closed, by `on_run_ended` or the caller: the final state is drawn
            return
        self._dirty.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._render_loop, name="nexa-dashboard", daemon=True)
            self._thread.start()

    def on_step_end(self, event: StepEnd) -> None:
        if event.rank == 0:
            with self._lock:
                self._time_step(event.step)

    def on_run_ended(self, event: RunEnded) -> None:
        self.close()

    def close(self) -> None:
        """Stop the render thread and draw the final state. Safe to call more than once."""
        self._stopped.set()
        self._dirty.set()  # wake the render thread so it sees the stop
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()

    # --- main thread -----------------------------------------------------------------

    def show(self) -> None:
        """Display the live widget in the current cell (main thread, before training)."""
        self._display = display(self.widget, display_id=True)

    def finalize(self) -> None:
        """Main thread, after the run: swap the live widget for the static picture.

        The picture (`image/svg+xml`) takes the widget's place in the cell where `show` put
        it (or is displayed here when `show` was not called); the summary follows as
        `text/markdown`. The widgets are closed afterwards.
        """
        if self._finalized:
            return
        self.close()
        picture, summary = self.static_outputs()
        if self._display is not None:
            self._display.update(picture, raw=True)
        else:
            display(picture, raw=True)
        display(summary, raw=True)
        with self._lock:
            self._finalized = True
            for child in self.widget.children + (self.accumulation, self.accumulation_view, self.widget):
                for part in (child, child.layout, getattr(child, "style", None)):
                    if part is not None:
                        part.close()

    def static_outputs(self) -> tuple[dict, dict]:
        """The two MIME bundles `finalize` displays: the picture and the summary."""
        with self._lock:
            svg, status, summary = run_svg(self.record), status_text(self.record), summary_text(self.record)
        return {"image/svg+xml": svg, "text/plain": status}, {"text/markdown": summary, "text/plain": summary}

    # --- drawing ---------------------------------------------------------------------

    def _render_loop(self) -> None:
        while not self._stopped.is_set():
            self._dirty.wait()
            self._dirty.clear()
            if self._stopped.is_set():
                return
            self.flush()
            self._stopped.wait(self.refresh_interval)

    def _time_step(self, step: int) -> None:
        now = self._clock()
        first_step, first_time = (step, now) if self._timing is None else self._timing[:2]
        self._timing = (first_step, first_time, step, now)

    def _eta(self) -> float | None:
        """Seconds left at the pace since rank 0's first step (the first step's own setup time is excluded)."""
        if self._timing is None:
            return None
        first_step, first_time, last_step, last_time = self._timing
        if last_step <= first_step:
            return None
        per_step = (last_time - first_time) / (last_step - first_step)
        return per_step * max(self.record.total_steps - last_step, 0)

    def flush(self) -> None:
        """Redraw everything from the record now."""
        with self._lock:
            if self._finalized:
                return
            record = self.record
            self.header_view.value = self._header_html()
            total = max(record.total_steps, record.step, 1)
            self.progress.max = total
            self.progress.value = record.step
            self.progress.bar_style = BAR_STYLES.get(record.status, "")
            self.progress_view.value = self._progress_html()
            if record.micro:
                micro = record.micro[min(record.micro)]
                self.accumulation.max = micro.of
                self.accumulation.value = micro.micro
                self.accumulation_view.value = (
                    f'<span class="nexa-accum" data-micro="{micro.micro}" data-of="{micro.of}">'
                    f"micro-step {micro.micro}/{micro.of} towards step {micro.step}</span>"
                )
                self._accumulation_row.layout.display = None
            self.loss_view.value = loss_chart(record) + self._eval_html()
            lr_svg, grad_svg = scalar_charts(record)
            self.scalars_view.value = (
                f'<div>{self._scalars_text()}</div><div style="display:flex;flex-wrap:wrap">{lr_svg}{grad_svg}</div>'
            )
            self.memory_view.value = memory_chart(record.memory)
            self.status_view.value = self._status_html()
            self.step = record.step
            self.total = record.total_steps
            self.status = status_text(record)
            self.points_per_rank = {rank: len(series) for rank, series in record.loss.items()}
            self.memory_ranks = sorted(record.latest)
            self.render_count += 1

    def _header_html(self) -> str:
        started = self.record.started
        if started is None:
            return '<div class="nexa-plan">nexa: waiting for the run to start</div>'
        plan = started.plan_summary
        attrs = {
            "zero": "none" if plan.get("zero") is None else plan["zero"],
            "offload-optimizer": plan.get("offload_optimizer", "none"),
            "offload-param": plan.get("offload_param", "none"),
            "precision": plan.get("precision", "no"),
            "procs": plan.get("procs", started.num_processes),
            "effective-batch": plan.get("effective_batch", ""),
            "device": plan.get("device", ""),
        }
        data = "".join(f' data-{name}="{escape(str(value))}"' for name, value in attrs.items())
        first, *rest = plan_parts(plan)
        return f'<div class="nexa-plan"{data}><b>{escape(first)}</b> · {escape(" · ".join(rest))}</div>'

    def _progress_html(self) -> str:
        record = self.record
        parts = [f"step {record.step}/{record.total_steps}"]
        eta = self._eta()
        if record.status == "running" and eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        speed = run_speed(record)
        if speed is not None:
            samples, tokens = speed
            parts.append(f"{samples:,.1f} samples/s")
            if tokens is not None:
                parts.append(f"{tokens:,.0f} tokens/s")
        return (
            f'<span class="nexa-progress" data-step="{record.step}" data-total="{record.total_steps}">'
            f"{' · '.join(parts)}</span>"
        )

    def _scalars_text(self) -> str:
        latest = self.record.latest.get(0)
        if latest is None:
            return ""
        text = f"lr {latest.lr:.2e}"
        if latest.grad_norm is not None:
            text += f" · grad norm {latest.grad_norm:.3f}"
        if latest.mean_grad_norm is not None:
            text += f" (mean so far {latest.mean_grad_norm:.3f})"
        return f'<span class="nexa-scalars">{text}</span>'

    def _eval_html(self) -> str:
        last = self.record.last_eval
        if last is None:
            return ""
        metrics = escape(fmt_metrics(last.metrics))
        return f'<div class="nexa-eval" data-step="{last.step}">eval at step {last.step}: {metrics}</div>'

    def _status_html(self) -> str:
        record = self.record
        out = f'<div class="nexa-status" data-status="{record.status}">{escape(status_text(record))}</div>'
        if record.last_checkpoint is not None:
            checkpoint = record.last_checkpoint
            out += (
                f'<div class="nexa-checkpoint" data-step="{checkpoint.step}">'
                f"checkpoint at step {checkpoint.step}: {escape(checkpoint.path)}</div>"
            )
        notes = record.notes[-NOTES_SHOWN:]
        if notes:
            items = "".join(
                f'<li data-rank="{note.rank}">{f"rank {note.rank}: " if note.rank else ""}{escape(note.message)}</li>'
                for note in notes
            )
            out += f'<ul class="nexa-notes">{items}</ul>'
        return out
