"""What every figure shares: the step clock, A/B alternation, medians, the machine, the results file.

Timing. Both sides of a comparison train the same `Task`, whose ``forward`` is a `StepClock`:
it notes the wall time at the start of every forward pass, in whichever worker process runs
it, and writes the times to a small file once the run has made all its forward passes. The
start of optimizer step ``i`` is the start of its first micro-batch's forward, so the time from
step ``k`` to step ``k + m`` covers ``m`` whole optimizer steps of the loop (data loading,
forward, backward, all-reduce, clipping, the optimizer, and whatever the loop does between
steps), and nothing of process start-up or tear-down. The same clock runs on both sides.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSIONED = ("torch", "accelerate", "deepspeed", "transformers", "nexa-nb", "ipykernel", "ipywidgets", "nbclient")


# --- the step clock ----------------------------------------------------------------------


class StepClock:
    """A ``Task.forward`` that notes when each forward pass starts (``time.time()``, per process).

    ``calls`` is how many forward passes the run makes on each rank; after the last one, the
    rank writes ``<folder>/<label>-rank<R>.json`` with the times, the process's minor page faults
    at each of them and its torch thread count.
    The forward itself is nexa_nb's default: ``model(**batch)`` for a dict batch,
    ``model(*batch[:-1])`` for a tuple (the last item is the target).

    On a GPU the host runs ahead of the device, so the forward passes listed in ``sync_calls``
    (0-based; the bounds of the timed interval) wait for the device first: two
    synchronisations per run, the same on both sides.
    """

    def __init__(self, folder: str | os.PathLike, label: str, calls: int, sync_calls: tuple[int, ...] = ()):
        self.folder = str(folder)
        self.label = label
        self.calls = calls
        self.sync_calls = tuple(sync_calls)
        self.times: list[float] = []
        self.faults: list[int] = []  # the process's minor page faults so far, at each forward

    def __call__(self, model, batch):
        if len(self.times) in self.sync_calls:
            import torch

            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
        self.times.append(time.time())
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        if len(self.times) == self.calls:
            self._write()
        if isinstance(batch, dict):
            return model(**batch)
        return model(*batch[:-1])

    def _write(self) -> None:
        import torch

        rank = int(os.environ.get("RANK", "0"))
        path = Path(self.folder) / f"{self.label}-rank{rank}.json"
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        path.write_text(
            json.dumps(
                {
                    "times": self.times,
                    "faults": self.faults,
                    "threads": torch.get_num_threads(),
                    "cores": cores,
                    "pid": os.getpid(),
                }
            )
        )


def read_clock(folder: str | os.PathLike, label: str, rank: int = 0) -> dict[str, Any]:
    path = Path(folder) / f"{label}-rank{rank}.json"
    if not path.is_file():
        raise RuntimeError(
            f"run {label!r} wrote no step times for rank {rank} (it failed or made fewer "
            "forward passes than planned); see its output above"
        )
    return json.loads(path.read_text())


def step_starts(times: list[float], micro_per_step: int) -> list[float]:
    """The start of every optimizer step: the first forward of each group of micro-batches."""
    return times[::micro_per_step]


def steady_faults_per_step(faults: list[int], micro_per_step: int, warmup: int, measured: int) -> float:
    """Mean minor page faults per optimizer step over the same steps as `steady_seconds_per_step`."""
    starts = faults[::micro_per_step]
    return (starts[warmup + measured] - starts[warmup]) / measured


def steady_seconds_per_step(times: list[float], micro_per_step: int, warmup: int, measured: int) -> float:
    """Mean seconds per optimizer step over steps ``warmup .. warmup + measured - 1`` (0-based)."""
    starts = step_starts(times, micro_per_step)
    if len(starts) < warmup + measured + 1:
        raise RuntimeError(f"need {warmup + measured + 1} step starts, got {len(starts)}")
    return (starts[warmup + measured] - starts[warmup]) / measured


@dataclass(frozen=True)
class Steps:
    """How many optimizer steps a timed run makes: ``warmup`` untimed, ``measured`` timed, and one
    more whose start closes the timed interval."""

    warmup: int
    measured: int

    @property
    def total(self) -> int:
        return self.warmup + self.measured + 1

    def bounds(self, micro_per_step: int) -> tuple[int, int]:
        """The forward passes that open and close the timed interval (for `StepClock.sync_calls`)."""
        return self.warmup * micro_per_step, (self.warmup + self.measured) * micro_per_step


# --- A/B comparisons -----------------------------------------------------------------------


@dataclass
class Pairs:
    """The raw figures of an A/B comparison, in run order, and how busy the machine was meanwhile."""

    a: list[float]
    b: list[float]
    others: list[float]
    """Per pair: the cores that processes other than the harness and its children kept busy
    (`OthersOnCores`), on average over the pair's two runs."""


def alternate(
    repeats: int,
    run_a: Callable[[int], float],
    run_b: Callable[[int], float],
    log: Callable[[str], None] = print,
    names: tuple[str, str] = ("A", "B"),
) -> Pairs:
    """Run ``repeats`` pairs of A and B back to back, so that slow drift of the machine hits both
    sides; every other pair runs B first (A B, B A, A B, ...), so that whatever the first run of a
    pair leaves behind for the second (the parent's memory, caches, the cores' clock) falls on
    both sides alike."""
    pairs = Pairs([], [], [])
    for i in range(repeats):
        with OthersOnCores() as others:
            if i % 2:
                b = run_b(i)
                pairs.a.append(run_a(i))
                pairs.b.append(b)
            else:
                pairs.a.append(run_a(i))
                pairs.b.append(run_b(i))
        pairs.others.append(others.busy)
        log(
            f"    pair {i + 1}/{repeats}: {names[0]} {pairs.a[-1]:.4g}  {names[1]} {pairs.b[-1]:.4g}  "
            f"ratio {pairs.a[-1] / pairs.b[-1]:.4f}  others busy {others.busy:.3f} cores"
        )
    return pairs


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Goal:
    """A target for a figure: ``>= x``, ``<= x``, ``between lo and hi``, or none (``Goal()``).
    Informational only."""

    low: float | None = None
    high: float | None = None

    def met(self, value: float | None) -> bool | None:
        if value is None or (self.low is None and self.high is None):
            return None
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def text(self) -> str:
        if self.low is None and self.high is None:
            return "-"
        if self.low is not None and self.high is not None:
            return f"{self.low:g} .. {self.high:g}"
        return f">= {self.low:g}" if self.low is not None else f"<= {self.high:g}"


def at_least(x: float) -> Goal:
    return Goal(low=x)


def at_most(x: float) -> Goal:
    return Goal(high=x)


def between(lo: float, hi: float) -> Goal:
    return Goal(low=lo, high=hi)


@dataclass
class Figure:
    """One row of the results table, and everything behind it in the JSON file."""

    key: str
    title: str
    ratio: float | None
    goal: Goal
    n: int
    unit: str = ""
    """What the two sides measure (the ratio itself has no unit)."""
    sides: dict[str, Any] = field(default_factory=dict)
    """Side name -> {"values": raw figures in run order, "median": ...}."""
    details: dict[str, Any] = field(default_factory=dict)
    """Settings and anything else a reader needs to trust the ratio."""
    checks: dict[str, bool] = field(default_factory=dict)
    """Correctness checks (same final weights, nothing heavy imported, ...): a failed check means
    the ratio compares different work, whatever its value."""
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    spread: tuple[float, float] | None = None
    """The interquartile range of the values the ratio is the median of (the pair ratios)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "ratio": self.ratio,
            "spread_iqr": self.spread,
            "goal": self.goal.text(),
            "met_goal": self.goal.met(self.ratio),
            "n": self.n,
            "unit": self.unit,
            "checks": self.checks,
            "sides": self.sides,
            "details": self.details,
            "load_average": {"before": self.load_before, "after": self.load_after},
        }


def side(values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "median": median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ab_figure(
    key: str,
    title: str,
    goal: Goal,
    unit: str,
    names: tuple[str, str],
    a: list[float],
    b: list[float],
    checks: dict[str, bool] | None = None,
    others: list[float] | None = None,
    quiet_limit: float | None = None,
    **details: Any,
) -> Figure:
    """A figure whose ratio is A / B, taken as the median of the per-pair ratios, with their
    interquartile range as its spread.

    Each pair ran back to back, so its ratio is the least touched by drift; the median of
    each side, and the ratio of those medians, are kept beside it. ``others`` (per pair, the
    cores other processes kept busy) adds the check ``quiet_machine``: none above
    ``quiet_limit`` (default `QUIET_OTHERS_CORES`).
    """
    pairs = [x / y for x, y in zip(a, b)]
    details = {
        "pair_ratios": pairs,
        "pair_ratio_range": [min(pairs), max(pairs)],
        "ratio_of_medians": median(a) / median(b),
        **details,
    }
    checks = dict(checks or {})
    if others is not None:
        details["others_busy_cores_per_pair"] = [round(x, 4) for x in others]
        checks["quiet_machine"] = max(others) <= (QUIET_OTHERS_CORES if quiet_limit is None else quiet_limit)
    figure = Figure(
        key, title, median(pairs), goal, len(pairs), unit, {names[0]: side(a), names[1]: side(b)}, details, checks
    )
    figure.spread = quartiles(pairs)
    return figure


# --- the machine -------------------------------------------------------------------------


QUIET_OTHERS_CORES = 0.05
"""A pair is quiet when the other processes kept at most this many cores busy on average
(``--max-others`` changes it): on 2 cores, 0.05 is 2.5 % of the machine."""

QUIET_LOAD = 0.3
"""A timed run is refused when the 1-minute load average is above this before it starts
(``--max-load`` changes it, ``--noisy`` runs anyway and names the results file ``-noisy``)."""


def pin_cores(spec: str | None) -> list[int]:
    """Pin this process to the cores in `spec` ("0,1", "2-3"; None: those it may use now) and
    return them. Every process it starts, on both sides of a comparison, inherits the set."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    if spec:
        cores: set[int] = set()
        for part in spec.split(","):
            low, _, high = part.partition("-")
            cores.update(range(int(low), int(high or low) + 1))
        os.sched_setaffinity(0, cores)
    return sorted(os.sched_getaffinity(0))


class OthersOnCores:
    """How many of this process's cores other processes kept busy while the block ran: the busy
    time of those cores (``/proc/stat``, steal time included) less the CPU time of this process
    and of the children it has waited for, over the wall time. It reads 0 where it cannot tell
    (no per-core times).

    The load average says how many tasks were runnable, this harness's own workers included;
    this says how much of the machine something else took from both sides of a comparison.
    """

    def __init__(self):
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.busy = 0.0

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        per_core = psutil.cpu_times(percpu=True)
        cores = [per_core[c] for c in self.cores if c < len(per_core)]
        fields = ("user", "nice", "system", "irq", "softirq", "steal")
        busy = sum(getattr(t, f, 0.0) for t in cores for f in fields)
        own = os.times()
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self._sample()
        if t1 > t0 and self.cores:
            self.busy = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- results -----------------------------------------------------------------------------


def results_path(out_dir: str | os.PathLike, device: str, suffix: str = "", figures: Iterable[int | str] = ()) -> Path:
    """``<out_dir>/<date>-<device>-fig<N>_<N>...<suffix>.json``: named by the figures it holds, so
    runs of different figures never share a name (`write_results` keeps an existing file too)."""
    today = datetime.date.today().isoformat()
    held = "_".join(str(f) for f in figures)
    return Path(out_dir) / f"{today}-{device}{f'-fig{held}' if held else ''}{suffix}.json"


def reserve_new(path: Path) -> Path:
    """`path`, or the first of ``<stem>-2``, ``<stem>-3``, ... beside it that does not exist,
    created empty (exclusively, so two runs finishing at once get two names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return candidate
        except FileExistsError:
            n += 1


def write_results(
    path: Path,
    *,
    device: str,
    settings: dict[str, Any],
    figures: list[Figure],
    load_before: list[float],
    load_after: list[float],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the JSON atomically (a ``.tmp`` beside it, then renamed) to `path`, or, when a file
    of that name exists, to the next free ``-2``, ``-3`` name (`reserve_new`): an earlier
    results file is never overwritten. Returns the path written."""
    data = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_after},
        "versions": versions(),
        "settings": settings,
        "figures": {f.key: f.as_dict() for f in figures},
        **(extra or {}),
    }
    text = json.dumps(data, indent=1, default=str) + "\n"
    path = reserve_new(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:  # no empty or half-written results file left behind
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return path


def table(figures: list[Figure]) -> str:
    """figure | ratio | spread (interquartile range) | goal | against goal | n | checks | load (1-minute
    average before -> after)."""
    rows = [("figure", "ratio", "IQR", "goal", "vs goal", "n", "checks", "load 1m")]
    for f in figures:
        met = {True: "pass", False: "fail", None: "n/a"}[f.goal.met(f.ratio)]
        ratio = "n/a" if f.ratio is None else f"{f.ratio:.3f}"
        spread = "" if f.spread is None else f"{f.spread[0]:.3f}-{f.spread[1]:.3f}"
        failed = [name for name, ok in f.checks.items() if not ok]
        checks = ("FAILED: " + ", ".join(failed)) if failed else ("ok" if f.checks else "-")
        load = f"{f.load_before[0]:.2f} -> {f.load_after[0]:.2f}" if f.load_before and f.load_after else ""
        rows.append((f.title, ratio, spread, f.goal.text(), met, str(f.n), checks, load))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
