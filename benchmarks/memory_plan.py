"""Planned / measured memory per rank on the CPU: ``python -m benchmarks.memory_plan [--quick] [--out DIR]``.

For three GPT-2-style model sizes x gradient checkpointing off and on x ZeRO 0 and 3, one run
of ``nexa_nb.train`` (1 process, fp32, 4 optimizer steps).  In each worker, the model factory
notes the process's resident memory before it builds anything, and the task's forward notes
the peak resident memory so far (``ru_maxrss``) at every micro-step; the last forward comes
after three whole steps (the optimizer state is made at the first), so its peak covers
forward, backward and optimizer step.  Measured: that peak less the memory at the factory's
call, what training added to the process.  Planned: the plan's bytes per device
(`Plan.planned_device_bytes`) less the libraries a CPU worker is counted with
(`nexa_nb.memory.CPU_WORKER_BYTES`), which a forked worker already holds when the factory runs.
Goal: 0.85 to 1.15 in every case.

A second figure isolates the activations: the resident memory a step adds in the third step
(sampled every 0.2 ms from the forward of step 3 to that of step 4, against the memory at its
start) / the traced activation peak at the micro-batch.  The step's growth also holds the
gradients made in backward (model states, not activations), which set the peak when
checkpointing leaves few activations.  Results go to
``benchmarks/results/<date>-cpu-memory-plan.json`` (``-2``, ``-3`` ... when that file exists).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import nexa_nb
from benchmarks.common import reserve_new
from nexa_nb.memory import CPU_WORKER_BYTES

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"small": (2, 128), "medium": (4, 256), "large": (6, 384)}  # layers, width
VOCAB, LENGTH, MICRO_BATCH, STEPS = 4000, 128, 8, 4
GOAL = (0.85, 1.15)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpt2_factory(layers: int, width: int, folder: str):
    """A model factory that notes the worker's memory before building the model."""

    def make():
        from transformers import GPT2Config, GPT2LMHeadModel

        rank = os.environ.get("RANK", "0")
        Path(folder, f"start-{rank}.json").write_text(json.dumps(rss_bytes()))
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=LENGTH, n_embd=width, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config)

    return make


class StepSampler:
    """A task forward that samples the process's resident memory through one whole step.

    At the forward of step `first` it notes the resident memory and starts a thread that reads
    it every 0.2 ms; at the next forward it stops and writes the start, the step's highest
    sample and the process's peak so far.  The step's growth covers forward, backward (its
    gradients included) and the optimizer step."""

    def __init__(self, folder: str, first: int):
        self.folder, self.first, self.calls = folder, first, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.first:
            self.base, self.high, self.running = rss_bytes(), 0, True
            threading.Thread(target=self._sample, daemon=True).start()
        elif self.calls == self.first + 1:
            self.running = False
            figures = {"step_base": self.base, "step_high": self.high, "peak": peak_rss_bytes()}
            Path(self.folder, f"step-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(figures))
        return model(**batch)

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, rss_bytes())
            time.sleep(0.0002)


def lm_rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (LENGTH,), generator=g) for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def one_case(size: str, grad_ckpt: bool, zero: int, steps: int) -> dict:
    layers, width = SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        task = nexa_nb.Task(
            gpt2_factory(layers, width, folder),
            lm_rows(MICRO_BATCH * steps),
            forward=StepSampler(folder, first=steps - 1),
            name="memory-plan",
        )
        result = nexa_nb.train(
            task,
            zero=zero,
            grad_ckpt=grad_ckpt,
            batch_size=MICRO_BATCH,
            max_steps=steps,
            output_dir=str(Path(folder, "model")),
            run_dir=str(Path(folder, "record")),  # not in the repository's nexa_runs/
            sinks=[],
        )
        start = json.loads(Path(folder, "start-0.json").read_text())
        step = json.loads(Path(folder, "step-0.json").read_text())
    plan = result.plan
    planned = plan.planned_device_bytes - CPU_WORKER_BYTES
    measured = max(step["peak"], step["step_high"]) - start
    estimate = next(a for a in plan.activations if a.grad_ckpt == grad_ckpt)
    step_growth = step["step_high"] - step["step_base"]
    return {
        "size": size,
        "params": plan.total_params,
        "grad_ckpt": grad_ckpt,
        "zero": zero,
        "planned_bytes": planned,
        "measured_bytes": measured,
        "ratio": planned / measured,
        "step_planned_bytes": estimate.at(MICRO_BATCH),
        "step_measured_bytes": step_growth,
        "step_ratio": estimate.at(MICRO_BATCH) / step_growth,
    }


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed blocks below its mmap threshold (up to 32 MiB, raised as it goes) in its
        # arenas, reused without touching the resident size: with every block over 64 KiB mapped and
        # unmapped, the resident size follows the live tensors.  glibc reads it at start: run again.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.memory_plan", *sys.argv[1:]], env)
    import accelerate  # noqa: F401  (imported before the workers fork, as a kernel that trained once has them)
    import deepspeed  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model only, 2 steps: checks the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = ["small"] if args.quick else list(SIZES)
    steps = 2 if args.quick else STEPS
    cases = [one_case(s, ckpt, zero, steps) for s in sizes for ckpt in (False, True) for zero in (0, 3)]
    low, high = GOAL
    for c in cases:
        verdict = "pass" if low <= c["ratio"] <= high else "fail"
        print(
            f"{c['size']:6} {c['params']:>11,} params  ckpt {'on ' if c['grad_ckpt'] else 'off'}  ZeRO {c['zero']}  "
            f"planned {c['planned_bytes'] / 2**20:8.1f} MiB  measured {c['measured_bytes'] / 2**20:8.1f} MiB  "
            f"ratio {c['ratio']:.2f}  {verdict}; one step: planned {c['step_planned_bytes'] / 2**20:7.1f} MiB "
            f"measured {c['step_measured_bytes'] / 2**20:7.1f} MiB ratio {c['step_ratio']:.2f}"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    versions = {name: importlib.metadata.version(name) for name in ("torch", "deepspeed", "accelerate", "transformers")}
    results = {"goal": GOAL, "machine": machine, "versions": versions, "cases": cases}
    text = json.dumps(results, indent=2) + "\n"
    out = reserve_new(args.out / f"{stamp}-cpu-memory-plan{'-quick' if args.quick else ''}.json")
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
