"""Gradient-accumulation statistics of a run: what an accumulation cycle (one optimizer step
made of `grad_accum` micro-steps) cost on average, summed from rank 0's step events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nexa_nb.events import Event, MemorySample, RunStarted, Sink, StepEnd
from nexa_nb.text import format_bytes


@dataclass(frozen=True)
class AccumulationStats:
    """Rank 0's figures over the optimizer steps of one run (resumed runs: the steps it trained)."""

    optimizer_steps: int
    micro_steps: int
    mean_grad_norm: float | None
    """None when no step had a gradient norm (DeepSpeed fp16 steps skipped on overflow, say)."""
    mean_memory_bytes: int
    peak_memory_bytes: int
    """Device memory (the allocator's peak in each step) on a GPU; the process's RSS on a CPU."""
    mean_cycle_s: float

    def line(self) -> str:
        """One line for the end-of-run summary."""
        per_step = self.micro_steps // max(self.optimizer_steps, 1)
        norm = "" if self.mean_grad_norm is None else f", mean gradient norm {self.mean_grad_norm:.3g}"
        return (
            f"Accumulation: {self.optimizer_steps} steps of {per_step} micro-steps, "
            f"{self.mean_cycle_s:.3g} s a cycle{norm}, memory {format_bytes(self.mean_memory_bytes)} on average "
            f"(peak {format_bytes(self.peak_memory_bytes)})."
        )


def memory_in_use(sample: MemorySample) -> int:
    """The figure the statistics average: the device's peak where there is a device, else host RSS."""
    return sample.peak if sample.capacity else sample.host_rss


class AccumulationTally(Sink):
    """Adds up rank 0's `StepEnd` events as they arrive; a run that starts again (after an
    out-of-memory restart, with another micro-batch) starts the tally again."""

    def __init__(self) -> None:
        self.on_run_started(None)

    def on_run_started(self, event: RunStarted | None) -> None:
        self.steps = 0
        self.micro_steps = 0
        self.grad_norms: list[float] = []
        self.memory: list[int] = []
        self.cycle_s = 0.0

    def on_step_end(self, event: StepEnd) -> None:
        if event.rank != 0:
            return
        self.steps += 1
        self.micro_steps += event.grad_accum
        if event.grad_norm is not None:
            self.grad_norms.append(event.grad_norm)
        self.memory.append(memory_in_use(event.memory))
        self.cycle_s += event.accum_time_s

    def stats(self) -> AccumulationStats | None:
        if not self.steps:
            return None
        return AccumulationStats(
            optimizer_steps=self.steps,
            micro_steps=self.micro_steps,
            mean_grad_norm=sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None,
            mean_memory_bytes=round(sum(self.memory) / len(self.memory)),
            peak_memory_bytes=max(self.memory),
            mean_cycle_s=self.cycle_s / self.steps,
        )


def accumulation_stats(events: Iterable[Event]) -> AccumulationStats | None:
    """The statistics of a run's events (a run record's, say); None before its first step."""
    tally = AccumulationTally()
    for event in events:
        tally.handle(event)
    return tally.stats()
