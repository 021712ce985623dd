"""What a run looks like, as plain data, text and SVG strings.

`RunRecord` folds events into the few numbers and curves the outputs need; the functions
below turn a record into text and SVG. The live dashboard, the console sink and the static
picture a finished run leaves in the notebook all draw from here, so the chart in the saved
notebook is the same SVG as the live one, and all of it can be tested without widgets.

SVG elements carry a `class` and `data-*` attributes (rank, number of points, step) so a
browser test can query what is drawn without reading pixels.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from nexa_nb.accumulation import AccumulationTally
from nexa_nb.events import (
    CheckpointSaved,
    EvalEnd,
    MemorySample,
    MicroStep,
    Note,
    RunEnded,
    RunStarted,
    Sink,
    StepEnd,
)
from nexa_nb.memory import MeasuredTally
from nexa_nb.text import byte_unit, format_bytes, precision_label, strategy_label

PALETTE = (  # matplotlib's "tab10": distinct hues that people already read as "rank 0, 1, ..."
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MAX_POINTS = 600  # about one point per horizontal pixel of a chart; more adds bytes, not detail
EVAL_LOSS_KEYS = ("eval_loss", "loss")  # the metric drawn on the loss chart, first one present
CHART_WIDTH = 640  # fits a notebook cell at default zoom without a scroll bar
LOSS_HEIGHT = 220
SMALL_HEIGHT = 110  # lr and grad norm: trends only, half the loss chart
MEMORY_ROW = 20  # one text line per rank
STATIC_INK = "#222"  # exported pictures are images on an unknown page background: draw on white
LIVE_INK = "currentColor"  # live widgets follow the notebook theme (light or dark)


class Series:
    """One curve: x and y appended in O(1); `sample` picks at most `limit` points to draw."""

    __slots__ = ("xs", "ys")

    def __init__(self) -> None:
        self.xs: list[float] = []
        self.ys: list[float] = []

    def append(self, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)

    def __len__(self) -> int:
        return len(self.xs)

    def sample(self, limit: int = MAX_POINTS) -> list[tuple[float, float]]:
        """Evenly strided points, always with the last one; NaN and inf are left out."""
        n = len(self.xs)
        stride = max(1, math.ceil(n / limit))
        indices = list(range(0, n, stride))
        if indices and indices[-1] != n - 1:
            indices.append(n - 1)
        return [(self.xs[i], self.ys[i]) for i in indices if math.isfinite(self.ys[i])]


def reported_loss(event: StepEnd) -> float:
    """The loss a step reports: averaged over ranks when known, else this rank's."""
    return event.loss if event.mean_loss is None else event.mean_loss


class RunRecord(Sink):
    """Everything the outputs show, updated in O(1) per event.

    Curves of lr and grad norm come from rank 0 (they are the same on every rank); loss and
    memory are kept per rank. The console and the dashboard each feed one and draw from it.
    """

    def __init__(self) -> None:
        self.started: RunStarted | None = None
        self.ended: RunEnded | None = None
        self.step = 0  # last optimizer step rank 0 finished
        self.loss: dict[int, Series] = {}
        self.lr = Series()
        self.grad_norm = Series()
        self.eval_loss = Series()
        self.latest: dict[int, StepEnd] = {}  # last StepEnd of each rank
        self.micro: dict[int, MicroStep] = {}  # last MicroStep of each rank
        self.last_eval: EvalEnd | None = None
        self.last_checkpoint: CheckpointSaved | None = None
        self.notes: list[Note] = []
        self.first_mean_loss: float | None = None  # the run's first loss, averaged over ranks like the last
        self.accumulation = AccumulationTally()
        self.measured_memory = MeasuredTally()

    def on_run_started(self, event: RunStarted) -> None:
        self.started = event
        self.step = event.start_step
        self.notes.extend(Note(message) for message in event.notes)
        self.measured_memory.on_run_started(event)

    def on_micro_step(self, event: MicroStep) -> None:
        self.micro[event.rank] = event

    def on_step_end(self, event: StepEnd) -> None:
        self.loss.setdefault(event.rank, Series()).append(event.step, event.loss)
        self.accumulation.on_step_end(event)
        self.measured_memory.on_step_end(event)
        self.latest[event.rank] = event
        if event.rank == 0:
            if self.first_mean_loss is None:
                self.first_mean_loss = reported_loss(event)
            self.step = event.step
            self.lr.append(event.step, event.lr)
            if event.grad_norm is not None:
                self.grad_norm.append(event.step, event.grad_norm)

    def on_eval_end(self, event: EvalEnd) -> None:
        self.last_eval = event
        loss_key = next((k for k in EVAL_LOSS_KEYS if k in event.metrics), None)
        if loss_key is not None:
            self.eval_loss.append(event.step, event.metrics[loss_key])

    def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.last_checkpoint = event

    def on_note(self, event: Note) -> None:
        self.notes.append(event)

    def on_run_ended(self, event: RunEnded) -> None:
        self.ended = event
        self.step = event.step

    @property
    def plan(self) -> dict:
        return self.started.plan_summary if self.started else {}

    @property
    def start_step(self) -> int:
        return self.started.start_step if self.started else 0

    @property
    def total_steps(self) -> int:
        return self.started.total_steps if self.started else 0

    @property
    def memory(self) -> dict[int, MemorySample]:
        return {rank: self.latest[rank].memory for rank in sorted(self.latest)}

    @property
    def first_loss(self) -> float | None:
        if self.first_mean_loss is not None:
            return self.first_mean_loss
        curve = next(iter(self.loss.values()), None)
        return curve.ys[0] if curve else None

    @property
    def final_loss(self) -> float | None:
        if self.ended and self.ended.final_loss is not None:
            return self.ended.final_loss
        curve = self.loss.get(0)
        return curve.ys[-1] if curve else None

    @property
    def status(self) -> str:
        """ "waiting", "running", or the end status ("completed", "failed", "interrupted")."""
        if self.ended:
            return self.ended.status
        return "running" if self.started else "waiting"


# --- text ----------------------------------------------------------------------------


def plural(n: int, word: str, words: str) -> str:
    return f"{n} {word if n == 1 else words}"


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fmt_metrics(metrics: dict[str, float], sep: str = ", ") -> str:
    return sep.join(f"{name} {value:.4f}" for name, value in metrics.items())


def plan_strategy(plan: dict) -> str:
    """The strategy of a plan summary in two words: "ZeRO-3", "DDP", "single process"."""
    return strategy_label(plan.get("zero"), plan.get("distributed_type", "NO"))


def plan_precision(plan: dict) -> str:
    return precision_label(plan.get("precision", "no"))


def plan_parts(plan: dict) -> list[str]:
    """The resolved plan as short phrases, in the order a reader checks them."""
    parts = [plan_strategy(plan)]
    offload = [
        f"{what}={plan[key]}"
        for what, key in (("optimizer", "offload_optimizer"), ("param", "offload_param"))
        if plan.get(key, "none") != "none"
    ]
    if offload:
        parts.append("offload " + " ".join(offload))
    parts.append(plan_precision(plan))
    parts.append(plural(plan.get("procs", 1), "process", "processes"))
    parts.append(
        f"effective batch {plan.get('effective_batch', '?')} "
        f"(micro-batch {plan.get('micro_batch', '?')}, accum {plan.get('grad_accum', '?')})"
    )
    parts.append(plan.get("device", "cpu"))
    return parts


def end_message(ended: RunEnded) -> str:
    """`ended.message`, or "" where it only restates the status ("interrupted at step 7")."""
    return "" if ended.message == f"{ended.status} at step {ended.step}" else ended.message


def run_speed(record: RunRecord) -> tuple[float, float | None] | None:
    """Samples/s and tokens/s of the whole run: rank 0's rates times the processes, since
    every rank runs the same micro-batch (the same figure the engine keeps in its history)."""
    latest = record.latest.get(0)
    if latest is None:
        return None
    procs = record.started.num_processes if record.started else 1
    tokens = latest.tokens_per_s * procs if latest.tokens_per_s is not None else None
    return latest.samples_per_s * procs, tokens


def status_text(record: RunRecord) -> str:
    """One line: "running: step 5/20", "completed 20 steps", "failed at step 7: ..."."""
    ended = record.ended
    if ended is None:
        if record.started is None:
            return "waiting for the run to start"
        return f"running: step {record.step}/{record.total_steps}"
    if ended.status == "completed":
        return f"completed {plural(ended.step, 'step', 'steps')}"
    text = f"{ended.status} at step {ended.step}"
    message = end_message(ended)
    return f"{text}: {message}" if message else text


def summary_text(record: RunRecord) -> str:
    """One paragraph for the saved notebook, e.g.

    "Trained 40 steps with ZeRO-3 (bf16, 2 processes, effective batch 16): loss 2.31 ->
    0.42; interrupted at step 40 of 100."
    """
    plan = record.plan
    done = record.step - record.start_step
    text = (
        f"Trained {plural(done, 'step', 'steps')} with {plan_strategy(plan)} "
        f"({plan_precision(plan)}, {plural(plan.get('procs', 1), 'process', 'processes')}, "
        f"effective batch {plan.get('effective_batch', '?')})"
    )
    if record.start_step:
        text += f", resumed at step {record.start_step}"
    first, final = record.first_loss, record.final_loss
    if first is not None and final is not None:
        text += f": loss {first:.4g} -> {final:.4g}"
    ended = record.ended
    if ended is None:
        text += f"; still running at step {record.step} of {record.total_steps}."
    elif ended.status == "completed":
        text += "; completed."
    else:
        text += f"; {ended.status} at step {ended.step} of {record.total_steps}"
        message = end_message(ended)
        text += f": {message}." if message else "."
    if record.last_eval:
        text += f" Last eval (step {record.last_eval.step}): {fmt_metrics(record.last_eval.metrics)}."
    checkpoint = (ended and ended.checkpoint_dir) or (record.last_checkpoint and record.last_checkpoint.path)
    if checkpoint:
        text += f" Checkpoint: {checkpoint}."
    accumulation = record.accumulation.stats()
    if accumulation is not None and plan.get("grad_accum", 1) > 1:
        text += " " + accumulation.line()
    for line in (plan.get("batch_search"), record.measured_memory.line()):
        text += f"\n\n{line}." if line else ""
    return text


# --- SVG -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A series to draw, with the class and data attributes its polyline carries."""

    series: Series
    css_class: str
    color: str
    label: str
    data: tuple[tuple[str, object], ...] = ()
    dots: bool = False  # sparse series (evals): mark each point


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _svg(width: int, height: int, body: list[str], css_class: str, ink: str, background: str | None) -> str:
    fill = f'<rect width="100%" height="100%" fill="{background}"/>' if background else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11" fill="{ink}">{fill}{"".join(body)}</svg>'
    )


def _tick(value: float) -> str:
    return f"{value:.3g}"


def line_chart(
    curves: list[Curve],
    *,
    title: str,
    x_range: tuple[float, float],
    css_class: str,
    width: int = CHART_WIDTH,
    height: int = LOSS_HEIGHT,
    ink: str = LIVE_INK,
    background: str | None = None,
) -> str:
    """A chart of `curves` sharing one y axis; every curve gets a polyline, even when empty.

    `data-points` on a polyline is the number of recorded points; the drawn ones may be
    fewer (see `Series.sample`).
    """
    left, right, top, bottom = 52, 10, 22, 18  # room for y labels, title and x labels
    sampled = [curve.series.sample() for curve in curves]
    ys = [y for points in sampled for _, y in points]
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.1 or 1.0  # keep flat curves off the frame
    y0, y1 = y0 - pad, y1 + pad
    x0, x1 = x_range
    if x1 <= x0:
        x1 = x0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    body = [f'<text x="{left}" y="14" font-weight="bold">{_esc(title)}</text>']
    legend_x = width - right
    for curve in reversed([curve for curve in curves if curve.label]):
        body.append(f'<text x="{legend_x}" y="14" text-anchor="end" fill="{curve.color}">{_esc(curve.label)}</text>')
        legend_x -= 7 * len(curve.label) + 12  # rough width of 11 px sans-serif text
    for value in sorted({y0 + pad, (y0 + y1) / 2, y1 - pad}):  # a flat curve gets one label
        y = sy(value)
        body.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{ink}" stroke-opacity="0.15"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_tick(value)}</text>'
        )
    body.append(
        f'<text x="{left}" y="{height - 4}">step {_tick(x0)}</text>'
        f'<text x="{width - right}" y="{height - 4}" text-anchor="end">{_tick(x1)}</text>'
    )
    if not ys:
        body.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill-opacity="0.6">no data yet</text>'
        )
    for curve, points in zip(curves, sampled):
        attrs = "".join(f' data-{name}="{_esc(value)}"' for name, value in curve.data)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        body.append(
            f'<polyline class="{curve.css_class}"{attrs} data-points="{len(curve.series)}" '
            f'fill="none" stroke="{curve.color}" stroke-width="1.5" stroke-linejoin="round" '
            f'points="{coords}"/>'
        )
        if curve.dots:
            body.extend(
                f'<circle class="{curve.css_class}-point" data-step="{_esc(x)}" cx="{sx(x):.1f}" '
                f'cy="{sy(y):.1f}" r="3" fill="{curve.color}"/>'
                for x, y in points
            )
    return _svg(width, height, body, css_class, ink, background)


def _x_range(record: RunRecord) -> tuple[float, float]:
    return record.start_step, max(record.total_steps, record.step)


def rank_color(rank: int) -> str:
    return PALETTE[rank % len(PALETTE)]


def loss_chart(record: RunRecord, ink: str = LIVE_INK, background: str | None = None) -> str:
    """Train loss per rank (`polyline.nexa-loss[data-rank]`) and eval loss (`.nexa-eval-loss`)."""
    curves = [
        Curve(series, "nexa-loss", rank_color(rank), f"rank {rank}", data=(("rank", rank),))
        for rank, series in sorted(record.loss.items())
    ]
    if len(record.eval_loss):
        curves.append(Curve(record.eval_loss, "nexa-eval-loss", ink, "eval", dots=True))
    return line_chart(
        curves,
        title="loss",
        x_range=_x_range(record),
        css_class="nexa-loss-chart",
        ink=ink,
        background=background,
    )


def scalar_charts(record: RunRecord, ink: str = LIVE_INK, background: str | None = None) -> tuple[str, str]:
    """Learning rate and gradient norm of rank 0, each half as wide as the loss chart."""
    size = {"width": CHART_WIDTH // 2, "height": SMALL_HEIGHT, "ink": ink, "background": background}
    lr = line_chart(
        [Curve(record.lr, "nexa-lr", PALETTE[0], "")],
        title="learning rate",
        x_range=_x_range(record),
        css_class="nexa-lr-chart",
        **size,
    )
    grad = line_chart(
        [Curve(record.grad_norm, "nexa-grad-norm", PALETTE[0], "")],
        title="grad norm",
        x_range=_x_range(record),
        css_class="nexa-grad-chart",
        **size,
    )
    return lr, grad


def memory_height(ranks: int) -> int:
    return MEMORY_ROW * (max(ranks, 1) + 1)


def memory_chart(memory: dict[int, MemorySample], ink: str = LIVE_INK, background: str | None = None) -> str:
    """One row per rank (`g.nexa-memory-row[data-rank]`).

    With a device (capacity > 0) the bar is the device: reserved (light), allocated (solid)
    and a tick at the peak; the text adds host RSS. CPU-only runs draw host RSS against
    the largest one.
    """
    margin, label_w, bar_w = 8, 50, 150  # "rank 15" fits in 50 px; the rest is for the numbers
    on_device = any(sample.capacity for sample in memory.values())
    scale = max((sample.capacity if on_device else sample.host_rss for sample in memory.values()), default=0) or 1
    unit, size = byte_unit(scale)
    bar_x = margin + label_w
    body = [f'<text x="{margin}" y="14" font-weight="bold">memory per rank</text>']
    if not memory:
        body.append(f'<text x="{bar_x}" y="{MEMORY_ROW + 14}" fill-opacity="0.6">no samples yet</text>')

    def bar(y: int, rank: int, value: int, opacity: float) -> str:
        w = bar_w * min(value / scale, 1.0)
        return (
            f'<rect x="{bar_x}" y="{y + 4}" width="{w:.1f}" height="12" '
            f'fill="{rank_color(rank)}" fill-opacity="{opacity}"/>'
        )

    for row, (rank, sample) in enumerate(sorted(memory.items()), start=1):
        y = row * MEMORY_ROW
        parts = [f'<text x="{margin}" y="{y + 14}">rank {rank}</text>', bar(y, rank, scale, 0.12)]
        if on_device:
            peak_x = bar_x + bar_w * min(sample.peak / scale, 1.0)
            parts += [
                bar(y, rank, sample.reserved, 0.35),
                bar(y, rank, sample.allocated, 0.9),
                f'<line x1="{peak_x:.1f}" x2="{peak_x:.1f}" y1="{y + 2}" y2="{y + 18}" '
                f'stroke="{ink}" stroke-width="2"/>',
            ]
            detail = (
                f"alloc {sample.allocated / size:.2f} · reserved {sample.reserved / size:.2f} · "
                f"peak {sample.peak / size:.2f} / {sample.capacity / size:.2f} {unit} · "
                f"host {format_bytes(sample.host_rss)}"
            )
        else:
            parts.append(bar(y, rank, sample.host_rss, 0.9))
            detail = f"host RSS {format_bytes(sample.host_rss)}"
        parts.append(f'<text x="{bar_x + bar_w + 8}" y="{y + 14}">{_esc(detail)}</text>')
        body.append(
            f'<g class="nexa-memory-row" data-rank="{rank}" data-allocated="{sample.allocated}" '
            f'data-reserved="{sample.reserved}" data-peak="{sample.peak}" '
            f'data-capacity="{sample.capacity}" data-host-rss="{sample.host_rss}">{"".join(parts)}</g>'
        )
    return _svg(CHART_WIDTH, memory_height(len(memory)), body, "nexa-memory", ink, background)


def run_svg(record: RunRecord) -> str:
    """The static picture of a run: status line, loss, lr and grad norm, memory, on white."""
    style = {"ink": STATIC_INK, "background": None}  # the outer picture paints the white
    lr, grad = scalar_charts(record, **style)
    status_h = 24
    memory = record.memory
    blocks = [
        (0, status_h, loss_chart(record, **style)),
        (0, status_h + LOSS_HEIGHT, lr),
        (CHART_WIDTH // 2, status_h + LOSS_HEIGHT, grad),
        (0, status_h + LOSS_HEIGHT + SMALL_HEIGHT, memory_chart(memory, **style)),
    ]
    height = status_h + LOSS_HEIGHT + SMALL_HEIGHT + memory_height(len(memory))
    body = [
        (
            f'<text class="nexa-status" data-status="{_esc(record.status)}" x="8" y="16" '
            f'font-weight="bold">{_esc(status_text(record))}</text>'
        )
    ]
    body += [f'<g transform="translate({x},{y})">{svg}</g>' for x, y, svg in blocks]
    return _svg(CHART_WIDTH, height, body, "nexa-run", STATIC_INK, "white")
