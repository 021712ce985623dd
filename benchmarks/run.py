"""CPU benchmarks: ``python -m benchmarks.run [--quick] [--notebooks] [--only 1,3] [--cores 0,1] [--out DIR]``.

Figures (see README.md for the method of each):

1. loop parity: optimizer steps/s, nexa_nb / the hand-written Accelerate loop, 1 and 2 processes
2. dashboard cost: steps/s under ``%nexa_train`` in a real kernel, live Dashboard / ConsoleSink
3. accumulation: s per optimizer step at accumulation 4 in 2 processes, nexa_nb / a loop that
   all-reduces on every micro-batch
4. memory-plan fidelity: nexa_nb's model-state estimate / DeepSpeed's estimators
5. start-up: ``%load_ext nexa_nb`` seconds; time to the first optimizer step, nexa_nb.train /
   ``accelerate launch`` of the script ``%nexa_export`` writes
6. tutorials (only with ``--notebooks``): wall time and peak memory of each notebook in notebooks/
10. kernel memory (only with ``--only 10``): the kernel's RSS growth per model parameter while
    GPT-2-style models of 10M, 50M and 150M parameters train under ZeRO-3 in 2 processes
11. run-record cost: optimizer steps/s, nexa_nb.train (which writes the run's record) / the same
    plan launched with no record, 2 processes
12. attach lag: seconds from the end of a step in a detached run's worker to a follower
    (``nexa_nb.attach``, what ``%nexa_attach`` calls) seeing it, median and 95th percentile
13. against a plain hand loop: figure 1 in 1 process, the hand loop without nexa_nb's setting of
    the C allocator (what a user's own loop in a forked process gets)

Results go to ``benchmarks/results/<date>-cpu-fig<N>_<N>....json``, named by the figures run
(``--out`` to put them elsewhere); an existing file is never overwritten (``-2``, ``-3`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

# The harness process builds every task and forks the workers of both sides. If it ran a
# multi-threaded OpenMP op first, a forked worker using more than one thread can hang in
# libgomp (see README, "Known issue"); with one thread here, no OpenMP pool is ever forked.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset")

from benchmarks.common import (  # noqa: E402  (after the thread setting, on purpose)
    QUIET_LOAD,
    QUIET_OTHERS_CORES,
    Figure,
    Goal,
    OthersOnCores,
    StepClock,
    Steps,
    ab_figure,
    alternate,
    at_least,
    at_most,
    between,
    load_average,
    median,
    pin_cores,
    read_clock,
    results_path,
    side,
    steady_faults_per_step,
    steady_seconds_per_step,
    step_starts,
    table,
    write_results,
)
from benchmarks.handloop import run_hand_loop  # noqa: E402
from benchmarks.tasks import MlpShape, mlp_task  # noqa: E402
from nexa_nb import events as ev  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the CPU figures; written into the results file."""

    repeats: int = 9
    """A/B pairs per comparison (figures 1, 2, 3, 5b)."""
    parity_steps: Steps = Steps(warmup=10, measured=200)
    """Figure 1: a few seconds of steps per run, so that a 1 % difference is not lost in the
    jitter of a sub-second window."""
    steps: Steps = Steps(warmup=5, measured=50)
    """Optimizer steps of each timed run in figure 3."""
    dashboard_steps: Steps = Steps(warmup=5, measured=150)
    """Figure 2: long enough to span many dashboard redraws (one per 0.25 s)."""
    parity_shape: MlpShape = MlpShape(inputs=256, hidden=1024, depth=2)
    parity_micro_batch: int = 32
    accum_shape: MlpShape = MlpShape(inputs=256, hidden=1024, depth=2)
    accum_micro_batch: int = 4
    accum_steps: int = 4
    dashboard_procs: int = 2
    record_procs: int = 2
    """Figure 11 (with figure 1's model, micro-batch and steps)."""
    attach_procs: int = 2
    attach_runs: int = 3
    """Figure 12: detached runs, each followed from its start to its end."""
    attach_steps: int = 300
    """Figure 12: optimizer steps per run (seconds of steps, each giving one lag)."""
    startup_procs: int = 2
    load_ext_repeats: int = 10
    notebooks: str = "*"
    """Figure 6: which notebooks of notebooks/ (a glob on the name, without .ipynb)."""
    notebook_cell_timeout_s: int = 600
    """Figure 6: a cell running longer fails its notebook (the goal is 5 minutes for all)."""
    seed: int = 0
    lr: float = 1e-3
    max_others: float = QUIET_OTHERS_CORES
    """A pair whose runs other processes took more cores from (on average) fails ``quiet_machine``."""


QUICK = Settings(
    repeats=1,
    parity_steps=Steps(1, 3),
    steps=Steps(1, 3),
    dashboard_steps=Steps(1, 3),
    parity_shape=MlpShape(32, 64, 1),
    parity_micro_batch=8,
    accum_shape=MlpShape(32, 64, 1),
    accum_micro_batch=4,
    load_ext_repeats=2,
    attach_runs=1,
    attach_steps=5,
)


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def options(s: Settings, *, procs: int, micro_batch: int, grad_accum: int, steps: int) -> dict:
    """nexa_nb.train options, every one given so no environment variable changes them; the hand
    loops read the same dict."""
    return dict(
        precision="no",
        force_cpu=True,
        zero=None,
        procs=procs,
        batch_size=micro_batch,
        grad_accum=grad_accum,
        max_steps=steps,
        lr=s.lr,
        weight_decay=0.0,
        clip_norm=1.0,
        scheduler="constant",
        warmup_steps=0,
        seed=s.seed,
    )


def samples_for(opts: dict) -> int:
    """Exactly one epoch of the run's micro-batches, so both loops see every sample once, in the same order."""
    return opts["max_steps"] * opts["grad_accum"] * opts["batch_size"] * opts["procs"]


@dataclass
class Timed:
    """One timed run: mean seconds and minor page faults per steady optimizer step, rank 0's
    torch threads and the cores it could run on, final weights."""

    seconds: float
    faults: float
    threads: int
    cores: list[int]
    weights: dict


class Runs:
    """Timed runs of both sides on the same task, each with its own `StepClock`."""

    def __init__(self, work: Path):
        self.work = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # its own: labels restart at 1
        self.count = 0

    def _clock(self, opts: dict, name: str) -> StepClock:
        self.count += 1
        return StepClock(self.work, f"{name}-{self.count}", calls=opts["max_steps"] * opts["grad_accum"])

    def _timed(self, clock: StepClock, opts: dict, steps: Steps, weights: dict) -> Timed:
        data = read_clock(self.work, clock.label)
        seconds = steady_seconds_per_step(data["times"], opts["grad_accum"], steps.warmup, steps.measured)
        faults = steady_faults_per_step(data["faults"], opts["grad_accum"], steps.warmup, steps.measured)
        return Timed(seconds, faults, data["threads"], data["cores"], weights)

    def nexa(self, shape: MlpShape, opts: dict, steps: Steps, sinks=()) -> Timed:
        import nexa_nb

        clock = self._clock(opts, "nexa")
        model_dir = self.work / f"{clock.label}-model"  # written after the timed steps
        task = mlp_task(shape, samples_for(opts), forward=clock)
        record = str(self.work / f"{clock.label}-record")  # the run's record, out of the repository
        result = nexa_nb.train(task, sinks=list(sinks), output_dir=str(model_dir), run_dir=record, **opts)
        return self._completed(result, clock, opts, steps)

    def unrecorded(self, shape: MlpShape, opts: dict, steps: Steps) -> Timed:
        """As `nexa`, with no run record: the plan `nexa_nb.train` makes, given to the launcher
        `train` calls (`nexa_nb.launch.launch`) without the record's writer."""
        from nexa_nb.api import TrainResult, prepare
        from nexa_nb.config import resolve_config
        from nexa_nb.launch import launch

        clock = self._clock(opts, "unrecorded")
        task = mlp_task(shape, samples_for(opts), forward=clock)
        plan = prepare(task, resolve_config(arguments={**opts, "output_dir": str(self.work / f"{clock.label}-model")}))
        result = TrainResult.from_outcome(launch(plan, task, [], record=None), plan, task)
        return self._completed(result, clock, opts, steps)

    def _completed(self, result, clock: StepClock, opts: dict, steps: Steps) -> Timed:
        if result.status != "completed" or len(result.history) != opts["max_steps"]:
            raise RuntimeError(f"nexa_nb run did not complete: {result!r}")
        return self._timed(clock, opts, steps, result.trained_model().state_dict())

    def hand(
        self, shape: MlpShape, opts: dict, steps: Steps, sync_every_micro_step: bool = False, keep_freed: bool = True
    ) -> Timed:
        clock = self._clock(opts, "hand")
        path = self.work / f"{clock.label}-weights.pt"
        task = mlp_task(shape, samples_for(opts), forward=clock)
        run_hand_loop(task, opts, sync_every_micro_step, str(path), keep_freed=keep_freed)
        return self._timed(clock, opts, steps, torch.load(path))


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- figure 1 ----------------------------------------------------------------------------


def loop_parity(s: Settings, work: Path, procs: int, plain_hand_loop: bool = False) -> Figure:
    """Optimizer steps/s of nexa_nb.train / the hand-written Accelerate loop, same task.

    The hand loop's process gets nexa_nb's setting of the C allocator (see
    `nexa_nb.engine.host_memory`), so the figure compares the loops alone; with
    `plain_hand_loop` it does not (figure 13: what a user's own loop in a forked process gets).

    Both sides start the way nexa_nb does (a forked process for one, `notebook_launcher` for
    several) and time steps ``warmup .. warmup + measured`` inside rank 0 with the same
    `StepClock`, so start-up and tear-down are not in the figure. nexa_nb runs with no sink
    (its events are still made, queued and drained), which isolates the engine and launcher;
    the dashboard's cost is figure 2. Checks: both sides end with the same weights (the same
    work was done) and ran with the same number of torch threads.
    """
    steps = s.parity_steps
    opts = options(s, procs=procs, micro_batch=s.parity_micro_batch, grad_accum=1, steps=steps.total)
    runs = Runs(work)
    nexa_runs: list[Timed] = []
    hand_runs: list[Timed] = []

    def nexa(i):
        nexa_runs.append(runs.nexa(s.parity_shape, opts, steps))
        return 1 / nexa_runs[-1].seconds

    def hand(i):
        hand_runs.append(runs.hand(s.parity_shape, opts, steps, keep_freed=not plain_hand_loop))
        return 1 / hand_runs[-1].seconds

    number, name = (13, "against a plain hand loop") if plain_hand_loop else (1, "loop parity")
    log(
        f"figure {number}: {name}, {procs} process(es), {s.parity_shape.params:,} parameters, "
        f"micro-batch {s.parity_micro_batch}, {steps.measured} timed steps"
    )
    pairs = alternate(s.repeats, nexa, hand, log=log, names=("nexa_nb", "hand"))
    difference = max(max_difference(x.weights, y.weights) for x, y in zip(nexa_runs, hand_runs))
    threads = {"nexa_nb": sorted({r.threads for r in nexa_runs}), "hand_loop": sorted({r.threads for r in hand_runs})}
    cores = {
        "nexa_nb": sorted({tuple(r.cores) for r in nexa_runs}),
        "hand_loop": sorted({tuple(r.cores) for r in hand_runs}),
    }
    return ab_figure(
        f"{number}_{name.replace(' ', '_')}_{procs}proc",
        f"{number} {name}, {procs} proc",
        at_least(0.99),
        "optimizer steps/s",
        ("nexa_nb", "hand_loop"),
        pairs.a,
        pairs.b,
        checks={
            "same_final_weights": difference == 0.0,
            "same_torch_threads": threads["nexa_nb"] == threads["hand_loop"],
            "same_cores": cores["nexa_nb"] == cores["hand_loop"] and len(cores["nexa_nb"]) == 1,
        },
        others=pairs.others,
        quiet_limit=s.max_others,
        settings=opts,
        model_params=s.parity_shape.params,
        max_weight_difference=difference,
        torch_threads_per_process=threads,
        cores=cores["nexa_nb"],
        minor_page_faults_per_step={
            "nexa_nb": [round(r.faults, 1) for r in nexa_runs],
            "hand_loop": [round(r.faults, 1) for r in hand_runs],
        },
    )


# --- figure 2 ----------------------------------------------------------------------------

KERNEL_SETUP = """\
import torch
torch.set_num_threads(1)  # see benchmarks/README.md, "Known issue"
from benchmarks.common import StepClock
from benchmarks.tasks import MlpShape, mlp_task
SHAPE = MlpShape(**{shape!r})
%load_ext nexa_nb
"""

KERNEL_RUN = """\
%config NexaMagics.dashboard = {dashboard}
task = mlp_task(SHAPE, {samples}, forward=StepClock({work!r}, {label!r}, {calls}))
res = %nexa_train --procs {procs} --fp32 --batch-size {micro_batch} --grad-accum 1 --max-steps {steps} --lr {lr} --seed {seed}
assert res.status == "completed" and len(res.history) == {steps}, res
"""


def subprocess_env() -> dict[str, str]:
    """This environment with the repository importable and this interpreter's tools first on PATH."""
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PYTHONPATH=python_path, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


@contextmanager
def benchmark_kernel(folder: Path):
    """The name of a kernelspec for this interpreter, with the repository importable, this
    environment's tools first on PATH and the CPU forced, findable (through JUPYTER_PATH)
    while the block runs."""
    spec = folder / "kernels" / "nexa-bench"
    spec.mkdir(parents=True, exist_ok=True)
    env = subprocess_env()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nexa_nb benchmarks",
                "language": "python",
                "env": {"PYTHONPATH": env["PYTHONPATH"], "PATH": env["PATH"], "FORCE_CPU": "1"},
            }
        )
    )
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(folder)
    try:
        yield "nexa-bench"
    finally:
        if previous is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = previous


def dashboard_cost(s: Settings, work: Path) -> Figure:
    """Steps/s under ``%nexa_train`` with the live Dashboard / with ``NexaMagics.dashboard = False``
    (the ConsoleSink), in one real IPython kernel run by nbclient, so the widget comms are real.

    One notebook holds the runs, alternating dashboard and console cells. Times come from the
    workers' `StepClock` (steady steps only), so the figure is what the kernel's drawing costs
    the training processes (they share the CPU with it). Check: the dashboard cells did send
    widget messages, the console cells none.
    """
    import nbformat
    from nbclient import NotebookClient

    class CountingClient(NotebookClient):
        """nbclient, counting the widget comm messages each cell receives."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.comm_messages: dict[int, int] = {}

        def handle_comm_msg(self, outs, msg, cell_index):
            self.comm_messages[cell_index] = self.comm_messages.get(cell_index, 0) + 1
            return super().handle_comm_msg(outs, msg, cell_index)

    steps = s.dashboard_steps
    opts = options(s, procs=s.dashboard_procs, micro_batch=s.parity_micro_batch, grad_accum=1, steps=steps.total)
    cells = [KERNEL_SETUP.format(shape=asdict(s.parity_shape))]
    labels = []
    for i in range(s.repeats):
        for dashboard in (True, False):
            label = f"{'dashboard' if dashboard else 'console'}-{i}"
            labels.append((label, dashboard))
            cells.append(
                KERNEL_RUN.format(
                    dashboard=dashboard,
                    samples=samples_for(opts),
                    work=str(work),
                    label=label,
                    calls=steps.total,
                    procs=opts["procs"],
                    micro_batch=opts["batch_size"],
                    steps=steps.total,
                    lr=opts["lr"],
                    seed=opts["seed"],
                )
            )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    log(
        f"figure 2: dashboard cost, {len(labels)} runs in one kernel, {opts['procs']} processes, "
        f"{steps.measured} timed steps each"
    )
    with benchmark_kernel(work / "jupyter") as kernel:
        client = CountingClient(nb, kernel_name=kernel, timeout=1800, resources={"metadata": {"path": str(work)}})
        client.execute()

    rates = {True: [], False: []}
    messages = {True: [], False: []}
    for index, (label, dashboard) in enumerate(labels, start=1):
        data = read_clock(work, label)
        rates[dashboard].append(1 / steady_seconds_per_step(data["times"], 1, steps.warmup, steps.measured))
        messages[dashboard].append(client.comm_messages.get(index, 0))
    for i in range(s.repeats):
        log(f"    pair {i + 1}/{s.repeats}: dashboard {rates[True][i]:.4g}  console {rates[False][i]:.4g}")
    fig = ab_figure(
        "2_dashboard_cost",
        "2 dashboard / console",
        at_least(0.99),
        "optimizer steps/s",
        ("dashboard", "console"),
        rates[True],
        rates[False],
        settings=opts,
        model_params=s.parity_shape.params,
        widget_messages_per_run={"dashboard": messages[True], "console": messages[False]},
    )
    fig.checks = {
        "dashboard_sent_widget_messages": all(m > 0 for m in messages[True]),
        "console_sent_none": all(m == 0 for m in messages[False]),
    }
    return fig


# --- figure 3 ----------------------------------------------------------------------------


def accumulation(s: Settings, work: Path) -> Figure:
    """Seconds per optimizer step at accumulation 4 in 2 processes: nexa_nb (``accumulate``, one
    all-reduce per optimizer step) / the hand loop without ``accumulate`` (DDP all-reduces the
    gradients on every micro-batch's backward).

    The model is chosen so that communication matters on gloo: a few million parameters
    (about 9 MiB of fp32 gradients per all-reduce) at micro-batch 4, which keeps each
    backward's compute short next to its all-reduce. ``seconds_per_extra_all_reduce`` says
    how much one weighed. Check: the final weights agree to float rounding (the sums are
    grouped differently).
    """
    opts = options(s, procs=2, micro_batch=s.accum_micro_batch, grad_accum=s.accum_steps, steps=s.steps.total)
    runs = Runs(work)
    nexa_runs: list[Timed] = []
    every_runs: list[Timed] = []

    def nexa(i):
        nexa_runs.append(runs.nexa(s.accum_shape, opts, s.steps))
        return nexa_runs[-1].seconds

    def every(i):
        every_runs.append(runs.hand(s.accum_shape, opts, s.steps, sync_every_micro_step=True))
        return every_runs[-1].seconds

    log(
        f"figure 3: accumulation {s.accum_steps}, 2 processes, {s.accum_shape.params:,} parameters, "
        f"micro-batch {s.accum_micro_batch}"
    )
    pairs = alternate(s.repeats, nexa, every, log=log, names=("nexa_nb", "sync-every"))
    a, b = pairs.a, pairs.b
    difference = max(max_difference(x.weights, y.weights) for x, y in zip(nexa_runs, every_runs))
    return ab_figure(
        "3_accumulation",
        "3 accumulation / sync every",
        at_most(0.85),
        "seconds per optimizer step",
        ("nexa_nb", "sync_every_micro_step"),
        a,
        b,
        checks={"same_final_weights_within_1e-5": difference < 1e-5},
        others=pairs.others,
        quiet_limit=s.max_others,
        settings=opts,
        model_params=s.accum_shape.params,
        gradient_mib=round(s.accum_shape.params * 4 / 2**20, 2),
        max_weight_difference=difference,
        # The sync-every loop makes accum - 1 more all-reduces per step: their cost, roughly.
        seconds_per_extra_all_reduce=(median(b) - median(a)) / (s.accum_steps - 1),
    )


# --- figure 4 ----------------------------------------------------------------------------

MEMORY_SIZES = [
    (10_000_000, 1_000_000),
    (124_000_000, 38_600_000),
    (350_000_000, 51_500_000),
    (1_300_000_000, 128_000_000),
    (7_000_000_000, 500_000_000),
    (70_000_000_000, 1_050_000_000),
]


def memory_fidelity(s: Settings, work: Path) -> list[Figure]:
    """nexa_nb.memory.model_state_memory / DeepSpeed's estimators, per-device and host bytes.

    Over model sizes from 10M to 70B parameters, 1, 2 and 8 devices per node, 1 and 2 nodes:
    ``estimate_zero2_model_states_mem_needs`` for stages 1 and 2 with and without optimizer
    offload, ``estimate_zero3_model_states_mem_needs`` for stage 3 with no offload, optimizer
    offload and full offload, each with and without zero.Init. Deterministic: n is the number
    of comparisons, not repeats.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from nexa_nb.memory import model_state_memory

    ratios: list[dict] = []
    for total, largest in MEMORY_SIZES:
        for gpus in (1, 2, 8):
            for nodes in (1, 2):
                for stage in (1, 2):
                    for offload in ("none", "cpu"):
                        ours = model_state_memory(
                            total, largest, stage=stage, offload_optimizer=offload, gpus_per_node=gpus, num_nodes=nodes
                        )
                        host, device = estimate_zero2_model_states_mem_needs(
                            total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload != "none"
                        )
                        ratios.append(
                            {
                                "params": total,
                                "gpus": gpus,
                                "nodes": nodes,
                                "stage": stage,
                                "offload": offload,
                                "device": ours.device_bytes / device,
                                "host": ours.host_bytes / host,
                            }
                        )
                for opt, param in (("none", "none"), ("cpu", "none"), ("cpu", "cpu")):
                    for zero_init in (True, False):
                        ours = model_state_memory(
                            total,
                            largest,
                            stage=3,
                            offload_optimizer=opt,
                            offload_param=param,
                            gpus_per_node=gpus,
                            num_nodes=nodes,
                            zero_init=zero_init,
                        )
                        host, device, _ = estimate_zero3_model_states_mem_needs(
                            total,
                            largest,
                            num_gpus_per_node=gpus,
                            num_nodes=nodes,
                            cpu_offload=opt != "none",
                            cpu_offload_params=param != "none",
                            zero_init=zero_init,
                        )
                        ratios.append(
                            {
                                "params": total,
                                "gpus": gpus,
                                "nodes": nodes,
                                "stage": 3,
                                "offload": f"{opt}/{param}",
                                "zero_init": zero_init,
                                "device": ours.device_bytes / device,
                                "host": ours.host_bytes / host,
                            }
                        )
    values = [r[k] for r in ratios for k in ("device", "host")]
    low = min(ratios, key=lambda r: min(r["device"], r["host"]))
    high = max(ratios, key=lambda r: max(r["device"], r["host"]))
    log(f"figure 4: memory plan vs DeepSpeed, {len(values)} comparisons: {min(values):.4f} .. {max(values):.4f}")
    details = {"sizes": MEMORY_SIZES, "comparisons": len(values)}
    return [
        Figure(
            "4_memory_plan_min",
            "4 memory plan, min ratio",
            min(values),
            between(0.99, 1.01),
            len(values),
            "bytes",
            {"ours/deepspeed": side(values)},
            {**details, "worst_case": low},
        ),
        Figure(
            "4_memory_plan_max",
            "4 memory plan, max ratio",
            max(values),
            between(0.99, 1.01),
            len(values),
            "bytes",
            {"ours/deepspeed": side(values)},
            {**details, "worst_case": high},
        ),
    ]


# --- figure 5 ----------------------------------------------------------------------------

LOAD_EXT = """\
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
started = time.perf_counter()
shell.run_line_magic("load_ext", "nexa_nb")
seconds = time.perf_counter() - started
heavy = [m for m in ("torch", "deepspeed", "accelerate", "transformers") if m in sys.modules]
print(json.dumps({"seconds": seconds, "heavy_modules": heavy, "magics": "nexa_train" in shell.magics_manager.magics["line"]}))
"""

FRESH_KERNEL_TRAIN = """\
import json, sys, time
import torch
torch.set_num_threads(1)
import nexa_nb
from benchmarks.common import StepClock
from benchmarks.tasks import MlpShape, mlp_task
shape, samples, work, label, calls, options = json.loads(sys.argv[1])
task = mlp_task(MlpShape(**shape), samples, forward=StepClock(work, label, calls))
started = time.time()
result = nexa_nb.train(task, run_dir=f"{work}/{label}-record", **options)
assert result.status == "completed", result
print(json.dumps({"started": started}))
"""


def run_python(code: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_ext_time(s: Settings, work: Path) -> Figure:
    """Wall time of ``%load_ext nexa_nb`` in a fresh IPython shell (one new process per repeat),
    timed around the magic alone. Check: torch, DeepSpeed, Accelerate and Transformers are
    still not imported afterwards, and the magics are registered."""
    log(f"figure 5a: %load_ext nexa_nb, {s.load_ext_repeats} fresh processes")
    runs = [run_python(LOAD_EXT) for _ in range(s.load_ext_repeats)]
    seconds = [r["seconds"] for r in runs]
    heavy = sorted({m for r in runs for m in r["heavy_modules"]})
    fig = Figure(
        "5a_load_ext_seconds",
        "5a %load_ext nexa_nb (s)",
        median(seconds),
        at_most(0.3),
        len(seconds),
        "seconds",
        {"load_ext": side(seconds)},
        {"heavy_modules_imported": heavy},
    )
    fig.checks = {
        "torch_not_imported": "torch" not in heavy,
        "nothing_heavy_imported": not heavy,
        "magics_registered": all(r["magics"] for r in runs),
    }
    return fig


def startup(s: Settings, work: Path) -> Figure:
    """Seconds from the call to the end of the first optimizer step: nexa_nb.train / ``accelerate
    launch`` of the script ``%nexa_export`` writes for the same task and options.

    nexa_nb side: a fresh Python process plays the kernel; it imports torch and nexa_nb and
    builds the task (the notebook's cells), then the clock starts and ``nexa_nb.train`` runs
    (first launch in that process: Accelerate is imported then, as in a fresh kernel).
    accelerate side: the clock starts just before ``accelerate launch`` is started, so its
    Python start-up and imports count, as they do for a user who leaves the notebook for a
    script. The end of step 1 is taken as the start of step 2's forward on rank 0 (the same
    `StepClock` on both sides).
    """
    from nexa_nb.config import resolve_config
    from nexa_nb.export import export_script

    opts = options(s, procs=s.startup_procs, micro_batch=s.parity_micro_batch, grad_accum=1, steps=2)
    samples = samples_for(opts)
    folder = work / "export"
    folder.mkdir(exist_ok=True)
    label = "launch"
    task = mlp_task(s.parity_shape, samples, forward=StepClock(work, label, calls=2))
    files = export_script(task, resolve_config(arguments=opts), folder / "train.py")
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", files.accelerate_config, files.script]
    count = 0

    def first_step_end(label: str) -> float:
        data = read_clock(work, label)
        (work / f"{label}-rank0.json").unlink()
        return step_starts(data["times"], 1)[1]

    def nexa(i):
        nonlocal count
        count += 1
        name = f"fresh-{count}"
        args = [asdict(s.parity_shape), samples, str(work), name, 2, opts]
        started = run_python(FRESH_KERNEL_TRAIN, json.dumps(args))["started"]
        return first_step_end(name) - started

    def launch(i):
        started = time.time()
        proc = subprocess.run(command, cwd=folder, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"accelerate launch failed:\n{proc.stderr[-3000:]}")
        return first_step_end(label) - started

    log(f"figure 5b: time to the first optimizer step, {opts['procs']} processes")
    pairs = alternate(s.repeats, nexa, launch, log=log, names=("nexa_nb", "accelerate launch"))
    return ab_figure(
        "5b_startup",
        "5b start-up / accelerate launch",
        at_most(1.0),
        "seconds to the end of step 1",
        ("nexa_nb_train", "accelerate_launch"),
        pairs.a,
        pairs.b,
        others=pairs.others,
        quiet_limit=s.max_others,
        settings=opts,
        launch_command=" ".join(
            ["accelerate", "launch", "--config_file", Path(files.accelerate_config).name, "train.py"]
        ),
    )


# --- figure 6 ----------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process's descendants (the kernel and its workers), sampled every
    `interval` s: the sum of PSS (shared pages split between the processes that share them;
    RSS where PSS cannot be read), so forked workers are not counted twice."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                try:
                    total += child.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tutorials(s: Settings, work: Path) -> list[Figure]:
    """Wall time and peak memory (kernel + workers) of each notebook in notebooks/, run top to
    bottom by nbclient on the CPU. One run each (they take minutes). Two rows per notebook:
    minutes / 5 and GiB / 2, so the goal of both is <= 1."""
    import nbformat
    from nbclient import NotebookClient

    notebooks = sorted((ROOT / "notebooks").glob(f"{s.notebooks}.ipynb"))
    if not notebooks:
        log("figure 6: no notebook in notebooks/")
        return [
            Figure(
                "6_tutorials",
                "6 tutorials: none found",
                None,
                at_most(1.0),
                0,
                "",
                details={"note": "notebooks/ holds no .ipynb"},
            )
        ]
    figures = []
    for path in notebooks:
        log(f"figure 6: {path.name}")
        nb = nbformat.read(path, as_version=4)
        error = None
        started = time.perf_counter()
        with benchmark_kernel(work / "jupyter") as kernel, PeakMemory() as memory:
            try:
                NotebookClient(
                    nb,
                    kernel_name=kernel,
                    timeout=s.notebook_cell_timeout_s,
                    resources={"metadata": {"path": str(path.parent)}},
                ).execute()
            except Exception as exc:  # a failing tutorial is a result too
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # no terminal colours
                error = f"{type(exc).__name__}: {text[-400:]}"
        seconds = time.perf_counter() - started
        gib = memory.peak / 2**30
        details = {"seconds": round(seconds, 1), "peak_gib": round(gib, 3), "error": error}
        checks = {"ran_without_error": error is None}
        figures.append(
            Figure(
                f"6_{path.stem}_time",
                f"6 {path.stem}: minutes / 5",
                seconds / 300,
                at_most(1.0),
                1,
                "fraction of 5 minutes",
                details=details,
                checks=checks,
            )
        )
        figures.append(
            Figure(
                f"6_{path.stem}_memory",
                f"6 {path.stem}: GiB / 2",
                gib / 2,
                at_most(1.0),
                1,
                "fraction of 2 GiB",
                details=details,
                checks=checks,
            )
        )
    return figures


# --- figure 10 ---------------------------------------------------------------------------

KERNEL_MEMORY = """
import gc, json, sys, threading, time
import psutil, torch
import nexa_nb
from transformers import GPT2Config, GPT2LMHeadModel

layers, width, heads, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=8192, n_positions=64)

def model():
    return GPT2LMHeadModel(config)

with torch.device("meta"):  # counted without allocating a single weight in this process
    params = sum(p.numel() for p in model().parameters())
ids = torch.randint(0, 8192, (32, 64), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": row, "labels": row} for row in ids]
me = psutil.Process()
first = me.memory_info().rss
# A warm-up run of a tiny model: what the first run in a kernel imports (the launcher, Accelerate,
# DeepSpeed's Python side) is a one-time cost, reported apart from the per-parameter figure.
tiny = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=8192, n_positions=64)
nexa_nb.train(nexa_nb.Task(lambda: GPT2LMHeadModel(tiny), data, name="warm-up"), zero=3, procs=2, batch_size=2,
              max_steps=1, sinks=[], output_dir=folder + "-warm-up", run_dir=folder + "-warm-up-record")
task = nexa_nb.Task(model, data, name="gpt2")
gc.collect()
before = me.memory_info().rss
peak, running = before, True

def sample():
    global peak
    while running:
        peak = max(peak, me.memory_info().rss)
        time.sleep(0.02)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
result = nexa_nb.train(task, zero=3, procs=2, batch_size=2, max_steps=3, lr=1e-4, sinks=[], output_dir=folder,
                       run_dir=folder + "-record")
gc.collect()
after = me.memory_info().rss
running = False
sampler.join()
assert result.status == "completed", result
print(json.dumps({"params": params, "first_run_bytes": before - first, "before": before, "after": after,
                  "peak": max(peak, after),
                  "model_dir": result.model_dir}))
"""

# GPT-2-style shapes (layers, width, heads) of about 10M, 50M and 150M parameters (vocabulary 8192).
KERNEL_MEMORY_SHAPES = {"10M": (4, 384, 6), "50M": (9, 640, 10), "150M": (11, 1024, 16)}


def kernel_memory(s: Settings, work: Path) -> list[Figure]:
    """The notebook kernel's memory while a GPT-2-style model trains under ZeRO-3 in 2 processes:
    growth of its RSS at the peak (sampled every 20 ms) and after the run, in bytes per model
    parameter. A fresh Python process plays the kernel; a warm-up run of a tiny model goes first,
    so that the first run's imports (a few MiB, once per kernel: `first_run_bytes`) are not
    counted per parameter. The workers write the final model to disk; the kernel should hold
    none of it. Check: the model folder was written."""
    figures = []
    for label, (layers, width, heads) in KERNEL_MEMORY_SHAPES.items():
        log(f"figure 10: kernel memory, GPT-2 {label} ({layers} layers x {width}), ZeRO-3, 2 processes")
        r = run_python(KERNEL_MEMORY, str(layers), str(width), str(heads), str(work / f"model-{label}"), timeout=1800)
        peak, after = (r["peak"] - r["before"]) / r["params"], (r["after"] - r["before"]) / r["params"]
        figures.append(
            Figure(
                f"10_kernel_bytes_per_param_{label}",
                f"10 kernel growth at peak, GPT-2 {label} (B/param)",
                peak,
                at_most(0.05),
                1,
                "bytes of kernel RSS growth per model parameter",
                details={"params": r["params"], "bytes_per_param_after": after, **r},
                checks={"model_written": Path(r["model_dir"]).is_dir()},
            )
        )
    return figures


# --- figure 11 ---------------------------------------------------------------------------


def record_cost(s: Settings, work: Path) -> Figure:
    """Optimizer steps/s of ``nexa_nb.train``, which writes the run's record, / the same plan
    launched without one (`Runs.unrecorded`).

    The record is written in the kernel: its folder, ``run.json`` and the workers' log files
    before the workers start, then each batch of events the drain thread takes from the workers
    appended to ``events.jsonl`` as JSON (one write per batch), and ``result.json`` after the
    end. Without a record the drain hands the same events to the same (no) sinks and writes
    nothing, and the workers' output goes to a temporary folder instead. So the figure is what
    encoding and writing the events costs the workers, which share the CPU with the kernel.
    Both sides run with no sink, as in figure 1. Checks: the same final weights, and the
    recorded runs' records hold every one of rank 0's steps.
    """
    from nexa_nb.runs import EVENTS_FILE, Run, history_of

    steps = s.parity_steps
    opts = options(s, procs=s.record_procs, micro_batch=s.parity_micro_batch, grad_accum=1, steps=steps.total)
    runs = Runs(work)
    recorded: list[Timed] = []
    bare: list[Timed] = []

    def with_record(i):
        recorded.append(runs.nexa(s.parity_shape, opts, steps))
        return 1 / recorded[-1].seconds

    def without(i):
        bare.append(runs.unrecorded(s.parity_shape, opts, steps))
        return 1 / bare[-1].seconds

    log(
        f"figure 11: run-record cost, {opts['procs']} processes, {s.parity_shape.params:,} parameters, "
        f"{steps.measured} timed steps"
    )
    pairs = alternate(s.repeats, with_record, without, log=log, names=("recorded", "unrecorded"))
    records = sorted(runs.work.glob("nexa-*-record"))
    recorded_steps = [[h["step"] for h in history_of(Run(r).events())] for r in records]
    difference = max(max_difference(x.weights, y.weights) for x, y in zip(recorded, bare))
    return ab_figure(
        "11_record_cost",
        "11 run record / none",
        at_least(0.99),
        "optimizer steps/s",
        ("recorded", "unrecorded"),
        pairs.a,
        pairs.b,
        checks={
            "same_final_weights": difference == 0.0,
            "record_holds_every_step": len(records) == s.repeats
            and all(r == list(range(1, steps.total + 1)) for r in recorded_steps),
        },
        others=pairs.others,
        quiet_limit=s.max_others,
        settings=opts,
        model_params=s.parity_shape.params,
        max_weight_difference=difference,
        events_bytes_per_run=[(r / EVENTS_FILE).stat().st_size for r in records],
    )


# --- figure 12 ---------------------------------------------------------------------------


class SeenAt(ev.Sink):
    """A follower's sink: when (``time.time()``) it was handed each of rank 0's steps."""

    def __init__(self):
        self.seen: dict[int, float] = {}

    def on_step_end(self, event: ev.StepEnd) -> None:
        if event.rank == 0:
            self.seen.setdefault(event.step, time.time())


def percentile(values: list[float], p: int) -> float:
    """The `p`-th percentile (inclusive method; the value itself for a single one)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def attach_lag(s: Settings, work: Path) -> list[Figure]:
    """Seconds from the end of a step in a detached run's rank-0 worker to a follower seeing it.

    Each run is started with ``nexa_nb.train(..., detach=True)`` (a process of its own, which
    writes the record) and followed at once with ``nexa_nb.attach`` (what ``%nexa_attach``
    calls: `runs.follow` reading the record every `runs.POLL_S` s), whose sink notes when each
    of rank 0's ``StepEnd`` events arrives. The events carry no time, so the end of step k is
    taken from the worker's `StepClock`: the start of step k + 1's forward (the last step has
    none and is left out). The lag thus holds everything between a step's end and the follower
    seeing it: the engine reading the step's loss from the device a step later, the worker's
    batching of events (one send per 0.1 s), the runner's drain writing the record and the
    follower's polling. Worker and follower are on one machine, so their clocks agree. Checks:
    every run completed and the follower saw every one of its steps.
    """
    import nexa_nb
    from nexa_nb.runs import POLL_S

    opts = options(s, procs=s.attach_procs, micro_batch=s.parity_micro_batch, grad_accum=1, steps=s.attach_steps)
    lags: list[float] = []
    per_run: list[dict] = []
    complete = True
    log(f"figure 12: attach lag, {s.attach_runs} detached run(s) of {s.attach_steps} steps, {opts['procs']} processes")
    for i in range(s.attach_runs):
        label = f"detached-{i}"
        task = mlp_task(s.parity_shape, samples_for(opts), forward=StepClock(work, label, opts["max_steps"]))
        folders = {"run_dir": str(work / f"{label}-record"), "output_dir": str(work / f"{label}-model")}
        run = nexa_nb.train(task, detach=True, **folders, **opts)
        follower = SeenAt()
        result = nexa_nb.attach(run.run_dir, [follower])
        ends = read_clock(work, label)["times"][1:]  # step k ended when step k + 1's forward started
        run_lags = [follower.seen[k] - end for k, end in enumerate(ends, start=1) if k in follower.seen]
        lags += run_lags
        complete &= result.status == "completed" and sorted(follower.seen) == list(range(1, s.attach_steps + 1))
        per_run.append({"median_s": median(run_lags), "max_s": max(run_lags), "steps": len(run_lags)})
        log(f"    run {i + 1}/{s.attach_runs}: lag median {median(run_lags):.3f} s, max {max(run_lags):.3f} s")
    details = {"settings": opts, "per_run": per_run, "follower_poll_s": POLL_S}
    return [
        Figure(
            f"12_attach_lag_{name}",
            f"12 attach lag, {name} (s)",
            value,
            at_most(1.0),
            len(lags),
            "seconds from a step's end in the worker to the follower",
            {"lag_s": side(lags)},
            details,
            {"runs_completed_and_every_step_seen": complete},
        )
        for name, value in (("median", median(lags)), ("p95", percentile(lags, 95)))
    ]


# --- main --------------------------------------------------------------------------------

FIGURES = {
    1: lambda s, w: [loop_parity(s, w, 1), loop_parity(s, w, 2)],
    2: lambda s, w: [dashboard_cost(s, w)],
    3: lambda s, w: [accumulation(s, w)],
    4: memory_fidelity,
    5: lambda s, w: [load_ext_time(s, w), startup(s, w)],
    6: tutorials,
    10: kernel_memory,
    11: lambda s, w: [record_cost(s, w)],
    12: attach_lag,
    13: lambda s, w: [loop_parity(s, w, 1, plain_hand_loop=True)],
}
DEFAULT_FIGURES = [1, 2, 3, 4, 5, 11, 12, 13]
"""What a run without ``--only`` measures (figure 6 joins them with ``--notebooks``)."""

TIMED = {1, 2, 3, 5, 6, 11, 12, 13}
"""Figures that time something: other processes' load spoils them (figures 4 and 10 do not)."""

DETACHED = {12}
"""Timed figures whose runs are detached: their processes are not this one's children, so
`OthersOnCores` would count the run itself as another process's load. They get no
quiet_machine check; the load average before them still refuses a busy machine."""


def run_figure(number: int, s: Settings, work: Path) -> list[Figure]:
    """One figure (or its rows), with the load average and the other processes' load around
    each; an error becomes a row that says so."""
    before = load_average()
    started = time.perf_counter()
    with OthersOnCores() as others:
        try:
            figures = FIGURES[number](s, work)
        except Exception as exc:
            log(f"figure {number} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            figures = [
                Figure(
                    f"{number}_error",
                    f"{number} FAILED",
                    None,
                    Goal(),
                    0,
                    details={"error": f"{type(exc).__name__}: {exc}"},
                )
            ]
    after = load_average()
    for f in figures:
        f.load_before, f.load_after = before, after
        f.details.setdefault("wall_s", round(time.perf_counter() - started, 1))
        f.details["others_busy_cores"] = round(others.busy, 4)
        if number in TIMED - DETACHED and not f.key.endswith("_error"):
            f.checks.setdefault("quiet_machine", others.busy <= s.max_others)
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, 1 repeat, few steps: checks the harness, not the speed"
    )
    parser.add_argument(
        "--notebooks",
        nargs="?",
        const="*",
        metavar="GLOB",
        help="also run figure 6, the tutorial notebooks (slow); GLOB picks some, e.g. '02_*'",
    )
    parser.add_argument("--only", metavar="N[,N]", help="run only these figures, e.g. --only 1,3")
    parser.add_argument("--repeats", type=int, metavar="N", help="A/B pairs per comparison (default 9; 1 with --quick)")
    parser.add_argument(
        "--cores", metavar="LIST", help="pin the harness and both sides to these cores, e.g. 0,1 or 2-3 (default: all)"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=QUIET_LOAD,
        metavar="L",
        help=f"refuse to start above this 1-minute load average (default {QUIET_LOAD})",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=QUIET_OTHERS_CORES,
        metavar="C",
        help=f"flag a pair during which other processes kept more cores busy (default {QUIET_OTHERS_CORES})",
    )
    parser.add_argument(
        "--noisy", action="store_true", help="run above --max-load anyway; the results file is named -noisy"
    )
    parser.add_argument(
        "--out", metavar="DIR", default=str(RESULTS), help="folder for the results JSON (default benchmarks/results)"
    )
    return parser.parse_args(argv)


def figure_numbers(only: str) -> list[int]:
    """The figures ``--only`` names, or [] when it names one that is not a CPU figure."""
    try:
        numbers = [int(n) for n in only.split(",")]
    except ValueError:
        return []
    return numbers if all(n in FIGURES for n in numbers) else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, max_others=args.max_others)
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    if args.notebooks:
        settings = replace(settings, notebooks=args.notebooks)
    numbers = figure_numbers(args.only) if args.only else DEFAULT_FIGURES + ([6] if args.notebooks else [])
    if not numbers:
        print(
            f"benchmarks.run: --only {args.only}: name figures among {sorted(FIGURES)}, e.g. --only 1,11 "
            "(the GPU figures 7-9: python -m benchmarks.gpu)",
            file=sys.stderr,
        )
        return 2
    try:
        cores = pin_cores(args.cores)
    except (ValueError, OSError) as exc:
        usable = sorted(os.sched_getaffinity(0))
        print(f"benchmarks.run: --cores {args.cores}: {exc}; give cores among {usable}, e.g. 0,1", file=sys.stderr)
        return 2
    load_before = load_average()
    busy = bool(load_before) and load_before[0] > args.max_load
    if busy and not args.quick and not args.noisy and TIMED & set(numbers):
        print(
            f"benchmarks.run: the 1-minute load average is {load_before[0]}, above {args.max_load}: the figures would "
            "measure the other processes. Wait for a quiet machine (see benchmarks/README.md), or pass --noisy "
            "to run anyway (the results file is then named -noisy)",
            file=sys.stderr,
        )
        return 2
    log(
        f"load average before: {load_before}; cores {cores}; figures {numbers}; "
        f"{'quick' if args.quick else 'full'} settings"
    )

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="nexa-bench-") as tmp:
        for number in numbers:
            figures += run_figure(number, settings, Path(tmp))
    load_after = load_average()

    timed = bool(TIMED & set(numbers))  # a busy machine does not change the others (figures 4, 10)
    noisy = (busy and timed) or not all(f.checks.get("quiet_machine", True) for f in figures)
    suffix = "-quick" if args.quick else ("-noisy" if noisy else "")
    path = write_results(
        results_path(args.out, "cpu", suffix, figures=numbers),
        device="cpu",
        settings={
            **asdict(settings),
            "figures_run": numbers,
            "quick": args.quick,
            "cores": cores,
            "max_load": args.max_load,
            "noisy": noisy,
        },
        figures=figures,
        load_before=load_before,
        load_after=load_after,
    )
    print()
    print(table(figures))
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {load_after}; cores {cores}")
    if noisy and not args.quick:
        print("the machine was not quiet (see the quiet_machine checks): these figures measure its other load too")
    print(f"results: {path}")
    return 1 if any(f.key.endswith("_error") for f in figures) else 0  # goals are informational


if __name__ == "__main__":
    sys.exit(main())
