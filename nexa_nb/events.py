"""Events that training workers send to the notebook, and the sink protocol that consumes them.

Workers never render anything: they put these small, picklable records on a queue, a
thread in the kernel drains it and hands every event to each sink (console, widgets,
trackers).  Keeping the records plain dataclasses means a recorded stream can be replayed
into any sink in a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MemorySample:
    """Memory of one rank, in bytes. Device figures are 0 on a CPU-only run."""

    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    capacity: int = 0
    host_rss: int = 0


@dataclass(frozen=True)
class RunStarted:
    """Sent once by rank 0 after `Accelerator.prepare`, before the first step."""

    plan_summary: dict[str, Any]
    total_steps: int
    num_processes: int
    distributed_type: str
    notes: tuple[str, ...] = ()
    start_step: int = 0


@dataclass(frozen=True)
class MicroStep:
    """Accumulation progress: micro-step `micro` of `of` towards optimizer step `step`."""

    rank: int
    step: int
    micro: int
    of: int


@dataclass(frozen=True)
class StepEnd:
    """One optimizer step finished on `rank`. `loss` is this rank's; `mean_loss` is averaged over ranks."""

    rank: int
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float | None
    samples_per_s: float
    tokens_per_s: float | None
    memory: MemorySample
    epoch: int = 0
    grad_accum: int = 1
    micro_batch: int = 1
    accum_time_s: float = 0.0
    mean_grad_norm: float | None = None
    mean_loss: float | None = None


@dataclass(frozen=True)
class EvalEnd:
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class Note:
    """A one-line message for the user (a fallback taken, a retry, a warning)."""

    message: str
    rank: int = 0


@dataclass(frozen=True)
class RunEnded:
    """The run is over. `status` is one of "completed", "failed", "interrupted"."""

    status: str
    step: int
    final_loss: float | None = None
    message: str = ""
    checkpoint_dir: str | None = None


Event = RunStarted | MicroStep | StepEnd | EvalEnd | CheckpointSaved | Note | RunEnded


HOOKS = {  # event class -> the `Sink` method that takes it: the one place events are told apart
    RunStarted: "on_run_started",
    MicroStep: "on_micro_step",
    StepEnd: "on_step_end",
    EvalEnd: "on_eval_end",
    CheckpointSaved: "on_checkpoint_saved",
    Note: "on_note",
    RunEnded: "on_run_ended",
}


class Sink:
    """Anything that turns events into output. Sinks observe; they never steer training.

    Callers use only `handle(event)` and `close()`. `handle` calls the hook for the event's
    type (`HOOKS`); a subclass overrides the hooks it needs, the others do nothing.
    """

    def handle(self, event: Event) -> None:
        hook = HOOKS.get(type(event))
        if hook is not None:
            getattr(self, hook)(event)

    def on_run_started(self, event: RunStarted) -> None:
        pass

    def on_micro_step(self, event: MicroStep) -> None:
        pass

    def on_step_end(self, event: StepEnd) -> None:
        pass

    def on_eval_end(self, event: EvalEnd) -> None:
        pass

    def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
        pass

    def on_note(self, event: Note) -> None:
        pass

    def on_run_ended(self, event: RunEnded) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RecordingSink(Sink):
    """Keeps every event; useful for tests and for replaying a run into another sink."""

    events: list = field(default_factory=list)

    def handle(self, event: Event) -> None:
        self.events.append(event)


def fan_out(sinks, event: Event) -> None:
    """Hand `event` to every sink, in order."""
    for sink in sinks:
        sink.handle(event)
