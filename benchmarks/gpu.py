"""GPU benchmarks: ``python -m benchmarks.gpu [--quick] [--only 7,8,9a,9b] [--out DIR]``.

Figures (one CUDA GPU; see README.md for the method of each):

7. MFU of GPT-2 124M and 350M trained through nexa_nb and through the hand-written Accelerate
   loop (bf16, sequence 1024, random tokens), and tokens/s of nexa_nb / the hand-written loop
8. measured peak device memory / nexa_nb's planned model-state memory, per ZeRO stage
9. a) ZeRO-2 with the optimizer offloaded to the CPU: s per step / without offload;
   b) largest model that trains with ZeRO-3 and full CPU offload / largest without offload

Refuses, measuring nothing, where there is no CUDA GPU. The harness never initialises CUDA
itself (nexa_nb forks its workers from this process, and a CUDA context here would break the
fork): it finds the GPU with nvidia-smi, and only the workers touch the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import (
    Figure,
    Goal,
    StepClock,
    Steps,
    ab_figure,
    alternate,
    at_least,
    at_most,
    between,
    load_average,
    median,
    read_clock,
    results_path,
    side,
    steady_seconds_per_step,
    table,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 50257

# Dense bf16 peak in TFLOPS (no sparsity), from NVIDIA's data sheets. The most specific name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(gpu_name: str) -> float | None:
    name = gpu_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def log(message: str) -> None:
    print(f"[bench-gpu] {message}", flush=True)


# --- the model and data ------------------------------------------------------------------


@dataclass(frozen=True)
class Gpt2Shape:
    """A GPT-2-style decoder: ``layers`` blocks of width ``width`` with 64-wide heads."""

    layers: int
    width: int
    heads: int
    seq: int = 1024

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.width}"


GPT2_124M = Gpt2Shape(12, 768, 12)
GPT2_350M = Gpt2Shape(24, 1024, 16)


def gpt2(layers: int, width: int, heads: int, seq: int):
    """GPT2LMHeadModel from a config (no download), dropout off, PyTorch's SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_positions=seq,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


class RandomTokens:
    """``n`` sequences of uniformly random token ids; sample ``i`` is the same on every call."""

    def __init__(self, n: int, seq: int):
        self.n, self.seq = n, seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        ids = torch.randint(0, VOCAB, (self.seq,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def gpt2_task(shape: Gpt2Shape, samples: int, forward=None):
    import functools

    import nexa_nb

    return nexa_nb.Task(
        functools.partial(gpt2, shape.layers, shape.width, shape.heads, shape.seq),
        RandomTokens(samples, shape.seq),
        forward=forward,
        name=f"gpt2-{shape.name}",
    )


def param_counts(shape: Gpt2Shape) -> tuple[int, int, int]:
    """(total, largest layer, position-embedding) parameters, counted on the meta device."""
    import torch

    from nexa_nb.memory import count_params

    with torch.device("meta"):
        model = gpt2(shape.layers, shape.width, shape.heads, shape.seq)
    total, largest = count_params(model)
    return total, largest, model.transformer.wpe.weight.numel()


def flops_per_token(shape: Gpt2Shape) -> float:
    """PaLM / nanoGPT: 6N + 12 L H Q T, N the parameters without the position embedding (the
    token embedding counts: it is the tied output layer), H heads of width Q, T tokens."""
    total, _, positions = param_counts(shape)
    return 6 * (total - positions) + 12 * shape.layers * shape.heads * (shape.width // shape.heads) * shape.seq


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the GPU figures; written into the results file."""

    repeats: int = 3
    mfu_models: tuple[str, ...] = ("124M", "350M")
    mfu_steps: Steps = Steps(warmup=10, measured=30)
    mfu_micro_batch: int = 16
    memory_shape: Gpt2Shape = Gpt2Shape(24, 1024, 16, seq=128)
    """Figure 8: GPT-2 350M on short sequences at micro-batch 1, so activations are small
    next to the model states."""
    offload_shape: Gpt2Shape = GPT2_350M
    offload_micro_batch: int = 8
    offload_accum: int = 4
    offload_steps: Steps = Steps(warmup=3, measured=10)
    search_seq: int = 512
    search_layers: int = 24
    search_start_width: int = 1024
    search_try_timeout_s: int = 900
    search_budget_s: int = 3600
    seed: int = 0
    lr: float = 1e-4


QUICK = Settings(
    repeats=1,
    mfu_steps=Steps(2, 3),
    mfu_micro_batch=4,
    offload_steps=Steps(1, 2),
    offload_micro_batch=2,
    offload_accum=2,
    search_try_timeout_s=600,
    search_budget_s=900,
)


def options(s: Settings, *, micro_batch: int, grad_accum: int, steps: int, **more) -> dict:
    """nexa_nb.train options for one GPU, every one given; ``more`` adds or replaces (zero=2, ...)."""
    return {
        **dict(
            precision="bf16",
            force_cpu=False,
            zero=None,
            procs=1,
            batch_size=micro_batch,
            grad_accum=grad_accum,
            max_steps=steps,
            lr=s.lr,
            weight_decay=0.0,
            clip_norm=1.0,
            scheduler="constant",
            warmup_steps=0,
            seed=s.seed,
        ),
        **more,
    }


def samples_for(opts: dict) -> int:
    return opts["max_steps"] * opts["grad_accum"] * opts["batch_size"] * opts["procs"]


def timed_nexa(shape: Gpt2Shape, opts: dict, steps: Steps, work: Path, label: str, sinks=()):
    """(seconds per steady optimizer step, TrainResult) of nexa_nb.train on GPT-2 `shape`."""
    import nexa_nb

    clock = StepClock(
        work, label, calls=opts["max_steps"] * opts["grad_accum"], sync_calls=steps.bounds(opts["grad_accum"])
    )
    result = nexa_nb.train(gpt2_task(shape, samples_for(opts), forward=clock), sinks=list(sinks), **opts)
    if result.status != "completed" or len(result.history) != opts["max_steps"]:
        raise RuntimeError(f"nexa_nb run did not complete: {result!r}")
    data = read_clock(work, label)
    return steady_seconds_per_step(data["times"], opts["grad_accum"], steps.warmup, steps.measured), result


def timed_hand(shape: Gpt2Shape, opts: dict, steps: Steps, work: Path, label: str) -> float:
    from benchmarks.handloop import run_hand_loop

    clock = StepClock(
        work, label, calls=opts["max_steps"] * opts["grad_accum"], sync_calls=steps.bounds(opts["grad_accum"])
    )
    run_hand_loop(gpt2_task(shape, samples_for(opts), forward=clock), opts)
    data = read_clock(work, label)
    return steady_seconds_per_step(data["times"], opts["grad_accum"], steps.warmup, steps.measured)


# --- figure 7 ----------------------------------------------------------------------------


def mfu(s: Settings, work: Path, gpu_name: str, peak: float | None) -> list[Figure]:
    """Model FLOPs utilisation of GPT-2 124M and 350M through nexa_nb, and nexa_nb / hand loop.

    bf16 autocast (Accelerate's ``mixed_precision="bf16"``), sequence 1024, random tokens, one
    GPU, no gradient accumulation. Steps ``warmup .. warmup + measured`` are timed in the
    worker, with the device synchronised at both ends of the interval. MFU = flops per token
    (`flops_per_token`) x tokens per second / the GPU's dense bf16 peak. nexa_nb and the
    hand-written loop alternate, one fresh process each run.
    """
    figures = []
    models = ((GPT2_124M, "124M", Goal()), (GPT2_350M, "350M", at_least(0.45)))
    for shape, label, goal in (m for m in models if m[1] in s.mfu_models):
        opts = options(s, micro_batch=s.mfu_micro_batch, grad_accum=1, steps=s.mfu_steps.total)
        tokens_per_step = opts["batch_size"] * shape.seq
        per_token = flops_per_token(shape)
        micro_batches = []

        def nexa(i, shape=shape, opts=opts, micro_batches=micro_batches, tokens_per_step=tokens_per_step):
            seconds, result = timed_nexa(shape, opts, s.mfu_steps, work, f"mfu-{shape.name}-nexa-{i}")
            micro_batches.append(result.plan.micro_batch)
            return tokens_per_step / seconds

        def hand(i, shape=shape, opts=opts, tokens_per_step=tokens_per_step):
            return tokens_per_step / timed_hand(shape, opts, s.mfu_steps, work, f"mfu-{shape.name}-hand-{i}")

        total = param_counts(shape)[0]
        log(f"figure 7: GPT-2 {label} ({total:,} parameters), micro-batch {opts['batch_size']} x {shape.seq} tokens")
        pairs = alternate(s.repeats, nexa, hand, log=log, names=("nexa_nb tokens/s", "hand tokens/s"))
        checks = {"no_out_of_memory_retry": all(m == opts["batch_size"] for m in micro_batches)}
        ratio = ab_figure(
            f"7_loop_parity_{label}",
            f"7 nexa/hand GPT-2 {label}",
            at_least(0.99),
            "tokens/s",
            ("nexa_nb", "hand_loop"),
            pairs.a,
            pairs.b,
            checks=checks,
            others_busy_cores_per_pair=pairs.others,  # recorded; the GPU figures are not refused for it
            settings=opts,
            params=total,
        )
        # The same model and tokens on both sides: MFU of each, from its own tokens/s.
        for who, rates, title in (("nexa_nb", pairs.a, ""), ("hand_loop", pairs.b, " (hand loop)")):
            utilisation = [x * per_token / (peak * 1e12) for x in rates] if peak else []
            figures.append(
                Figure(
                    f"7_mfu_{label}" + ("" if who == "nexa_nb" else "_hand_loop"),
                    f"7 MFU GPT-2 {label}{title}",
                    median(utilisation) if peak else None,
                    goal,
                    len(rates),
                    "model FLOPs / peak",
                    {f"{who}_mfu": side(utilisation)},
                    {
                        "flops_per_token": per_token,
                        "peak_tflops": peak,
                        "gpu": gpu_name,
                        "tokens_per_s": side(rates),
                        "settings": opts,
                        "params": total,
                    },
                    checks if who == "nexa_nb" else {},
                )
            )
        figures.append(ratio)
    return figures


# --- figure 8 ----------------------------------------------------------------------------


def memory_plan(s: Settings, work: Path) -> list[Figure]:
    """Peak device memory a run reached / the model-state memory nexa_nb plans for it.

    One run per setup (plain Accelerate, ZeRO 0, 1, 2, 3), GPT-2 350M, bf16, one GPU,
    micro-batch 1 of 128 tokens so that activations are small next to the model states.
    The peak is ``torch.cuda.max_memory_allocated`` as rank 0 reports it in its step events;
    the plan is `nexa_nb.memory.model_state_memory` for the same setup. The peak also holds
    activations, DeepSpeed's buckets and the optimizer's temporaries, so a little above 1 is
    expected. The details keep the run's whole plan (`Plan.planned_device_bytes`) beside them.
    """
    from nexa_nb.events import RecordingSink, StepEnd
    from nexa_nb.memory import model_state_memory

    shape = s.memory_shape
    total, largest, _ = param_counts(shape)
    figures = []
    for stage in (None, 0, 1, 2, 3):
        opts = options(s, micro_batch=1, grad_accum=1, steps=3, zero=stage)
        sink = RecordingSink()
        name = "plain" if stage is None else f"ZeRO-{stage}"
        log(f"figure 8: {name}, {total / 1e6:.0f}M parameters")
        _, result = timed_nexa(shape, opts, Steps(0, 2), work, f"memory-{name}", sinks=[sink])
        peak = max(e.memory.peak for e in sink.events if isinstance(e, StepEnd) and e.rank == 0)
        planned = model_state_memory(total, largest, stage=stage, gpus_per_node=1).device_bytes
        figures.append(
            Figure(
                f"8_memory_{name}",
                f"8 peak/plan {name}",
                peak / planned,
                between(0.9, 1.1),
                1,
                "bytes",
                details={
                    "peak_bytes": peak,
                    "planned_bytes": planned,
                    # the run's whole plan (model states, framework, activations at its micro-batch)
                    "whole_planned_bytes": result.plan.planned_device_bytes,
                    "params": total,
                    "largest_layer": largest,
                    "settings": opts,
                },
            )
        )
    return figures


# --- figure 9 ----------------------------------------------------------------------------


def offload_cost(s: Settings, work: Path) -> Figure:
    """Seconds per optimizer step, ZeRO-2 with the optimizer offloaded to the CPU
    (DeepSpeedCPUAdam) / ZeRO-2 without offload, GPT-2 350M, bf16, micro-batch 8 x
    accumulation 4 of 1024 tokens: a model that fits both ways. The CPU Adam op is compiled
    on first use; that happens before the timed steps."""
    shape = s.offload_shape
    base = options(
        s, micro_batch=s.offload_micro_batch, grad_accum=s.offload_accum, steps=s.offload_steps.total, zero=2
    )

    def offloaded(i):
        return timed_nexa(shape, {**base, "offload_optimizer": "cpu"}, s.offload_steps, work, f"offload-cpu-{i}")[0]

    def on_device(i):
        return timed_nexa(shape, base, s.offload_steps, work, f"offload-none-{i}")[0]

    log(f"figure 9a: ZeRO-2 optimizer offload, micro-batch {base['batch_size']} x accumulation {base['grad_accum']}")
    pairs = alternate(s.repeats, offloaded, on_device, log=log, names=("offload", "no offload"))
    return ab_figure(
        "9a_offload_step_time",
        "9a ZeRO-2 offload / none",
        at_most(1.5),
        "seconds per optimizer step",
        ("zero2_cpu_offload", "zero2"),
        pairs.a,
        pairs.b,
        others_busy_cores_per_pair=pairs.others,
        settings=base,
        params=param_counts(shape)[0],
    )


TRY_SIZE = """\
import json, sys
import nexa_nb
from benchmarks.gpu import Gpt2Shape, gpt2_task
shape, options = json.loads(sys.argv[1])
shape = Gpt2Shape(**shape)
try:
    result = nexa_nb.train(gpt2_task(shape, 2), sinks=[], **options)
    ok, message = result.status == "completed", result.status
except nexa_nb.TrainingError as exc:
    ok, message = False, str(exc).splitlines()[0][:300]
print(json.dumps({"ok": ok, "message": message}))
"""


def search_shape(s: Settings, k: int) -> Gpt2Shape:
    """The k-th model of the doubling search: width x sqrt(2) per step (about 2x parameters),
    rounded to 64-wide heads, at a fixed depth."""
    width = int(round(s.search_start_width * math.sqrt(2) ** k / 64) * 64)
    return Gpt2Shape(s.search_layers, width, width // 64, seq=s.search_seq)


def largest_model(s: Settings, work: Path) -> Figure:
    """Largest GPT-2-style model (parameters) that trains 2 steps at micro-batch 1 with ZeRO-3 and
    full CPU offload (optimizer and parameters) / the largest with ZeRO-3 and no offload.

    Doubling search from GPT-2 350M: each try is a fresh process that runs ``nexa_nb.train``
    and fails on an out-of-memory error at micro-batch 1 (device or host). The offload search
    starts at the largest size that trained without offload. Each search has half of
    ``search_budget_s``; a try that times out, or a search out of time, leaves a lower bound
    (check ``search_complete`` false).
    """
    tries: list[dict] = []

    def trains(k: int, offload: bool, deadline: float) -> bool | None:
        """Whether size k trains; None when the budget is spent or the try timed out."""
        shape = search_shape(s, k)
        opts = options(
            s,
            micro_batch=1,
            grad_accum=1,
            steps=2,
            zero=3,
            offload_optimizer="cpu" if offload else "none",
            offload_param="cpu" if offload else "none",
        )
        remaining = deadline - time.monotonic()
        if remaining < 60:
            return None
        log(f"figure 9b: {'full offload' if offload else 'no offload'}, {param_counts(shape)[0] / 1e9:.2f}B parameters")
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", TRY_SIZE, json.dumps([asdict(shape), opts])],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=min(s.search_try_timeout_s, remaining),
            )
            lines = proc.stdout.strip().splitlines()
            outcome = (
                json.loads(lines[-1])
                if proc.returncode == 0 and lines
                else {"ok": False, "message": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            )
        except subprocess.TimeoutExpired:
            outcome = {"ok": None, "message": "timed out"}
        tries.append(
            {
                "params": param_counts(shape)[0],
                "width": shape.width,
                "offload": offload,
                "seconds": round(time.monotonic() - started, 1),
                **outcome,
            }
        )
        return outcome["ok"]

    def search(start: int, offload: bool, budget: float) -> tuple[int | None, bool]:
        """(largest k that trained, whether the search found the first size that does not)."""
        deadline = time.monotonic() + budget
        best, k = None, start
        while True:
            ok = trains(k, offload, deadline)
            if ok is None:
                return best, False
            if not ok:
                return best, True
            best, k = k, k + 1

    # Half the budget each; the offload search starts where the other stopped.
    plain, plain_done = search(0, offload=False, budget=s.search_budget_s / 2)
    full, full_done = search(plain or 0, offload=True, budget=s.search_budget_s / 2)
    plain_params = param_counts(search_shape(s, plain))[0] if plain is not None else None
    full_params = param_counts(search_shape(s, full))[0] if full is not None else None
    ratio = full_params / plain_params if plain_params and full_params else None
    return Figure(
        "9b_largest_model",
        "9b largest: full offload / none",
        ratio,
        at_least(8),
        len(tries),
        "parameters",
        {
            "zero3_full_offload": side([full_params] if full_params else []),
            "zero3": side([plain_params] if plain_params else []),
        },
        {"tries": tries, "search_seq": s.search_seq, "search_layers": s.search_layers},
        {"search_complete": plain_done and full_done},
    )


# --- main --------------------------------------------------------------------------------


def find_gpu() -> tuple[str, int] | None:
    """(name, count) of the CUDA GPUs, found without initialising CUDA here; None without any
    or with a torch built without CUDA."""
    import torch

    from nexa_nb.hardware import probe

    gpus = probe().gpus
    if not gpus or not torch.backends.cuda.is_built():
        return None
    return gpus[0].name, len(gpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, 1 repeat: checks the harness, not the speed")
    parser.add_argument("--only", metavar="F[,F]", help="run only these figures: 7, 8, 9a, 9b (9 = both)")
    parser.add_argument("--repeats", type=int, metavar="N", help="A/B pairs per comparison (default 3)")
    parser.add_argument("--micro-batch", type=int, metavar="N", help="figure 7's micro-batch (default 16)")
    parser.add_argument("--models", metavar="M[,M]", help="figure 7's GPT-2 sizes: 124M, 350M (default both)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="T",
        help="the GPU's dense bf16 peak, for a GPU the built-in table does not know",
    )
    parser.add_argument("--search-budget", type=int, metavar="S", help="seconds for figure 9b's search (default 3600)")
    parser.add_argument("--out", metavar="DIR", default=str(RESULTS), help="folder for the results JSON")
    args = parser.parse_args(argv)

    found = find_gpu()
    if found is None:
        print(
            "benchmarks.gpu needs a CUDA GPU and a CUDA build of torch; none found here, nothing was measured. "
            "The CPU figures: python -m benchmarks.run",
            file=sys.stderr,
        )
        return 2
    gpu_name, gpu_count = found
    peak = args.peak_tflops or peak_tflops(gpu_name)

    s = QUICK if args.quick else Settings()
    if args.repeats:
        s = replace(s, repeats=args.repeats)
    if args.micro_batch:
        s = replace(s, mfu_micro_batch=args.micro_batch)
    if args.models:
        s = replace(s, mfu_models=tuple(m.strip() for m in args.models.split(",")))
    if args.search_budget:
        s = replace(s, search_budget_s=args.search_budget)
    wanted = {f.strip() for f in (args.only or "7,8,9a,9b").split(",")}
    if "9" in wanted:
        wanted |= {"9a", "9b"}
    # DeepSpeed compiles its CPU Adam with the first `ninja` on PATH: this environment's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    steps = [
        ("7", lambda w: mfu(s, w, gpu_name, peak)),
        ("8", lambda w: memory_plan(s, w)),
        ("9a", lambda w: [offload_cost(s, w)]),
        ("9b", lambda w: [largest_model(s, w)]),
    ]

    load_before = load_average()
    log(
        f"{gpu_name} x {gpu_count}, dense bf16 peak {peak or 'unknown'} TFLOPS; figures {sorted(wanted)}; "
        f"load average {load_before}"
    )
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="nexa-bench-gpu-") as tmp:
        for key, fn in steps:
            if key not in wanted:
                continue
            before, started = load_average(), time.perf_counter()
            try:
                rows = fn(Path(tmp))
            except Exception as exc:
                log(f"figure {key} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                rows = [
                    Figure(
                        f"{key}_error",
                        f"{key} FAILED",
                        None,
                        Goal(),
                        0,
                        details={"error": f"{type(exc).__name__}: {exc}"},
                    )
                ]
            for f in rows:
                f.load_before, f.load_after = before, load_average()
                f.details.setdefault("wall_s", round(time.perf_counter() - started, 1))
            figures += rows
    load_after = load_average()

    device = "-".join(gpu_name.lower().replace("nvidia", "").split()) or "gpu"
    path = write_results(
        results_path(args.out, device, "-quick" if args.quick else "", figures=sorted(wanted)),
        device=gpu_name,
        settings={**asdict(s), "figures_run": sorted(wanted), "quick": args.quick},
        figures=figures,
        load_before=load_before,
        load_after=load_after,
        extra={"gpu": {"name": gpu_name, "count": gpu_count, "peak_bf16_tflops": peak}},
    )
    print()
    print(table(figures))
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"results: {path}")
    return 1 if any(f.key.endswith("_error") for f in figures) else 0  # goals are informational


if __name__ == "__main__":
    sys.exit(main())
