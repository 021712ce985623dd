"""Plain text progress for scripts, CI logs and exported notebooks.

The same events give the same text: no timestamps, numbers with fixed precision. Two parts
of a line do vary between runs of the same code, so each can be turned off for output that
is compared (nbval, golden files): throughput (``show_speed``) and memory (``show_memory``;
it also depends on the order in which ranks report).

    nexa: ZeRO-3 | bf16 | 2 processes | effective batch 16 (micro-batch 2, accum 4) | cuda | 20 steps
    step 1/20 | loss 2.3100 | lr 1.00e-04 | grad 0.812 | 256.0 samples/s | mem r0 1.20/80.00 GiB
    eval step 10 | eval_loss 1.2000
    completed at step 20, final loss 0.4200
"""

from __future__ import annotations

import sys

from nexa_nb.events import CheckpointSaved, EvalEnd, Note, RunEnded, RunStarted, Sink, StepEnd
from nexa_nb.sinks.render import RunRecord, end_message, fmt_metrics, plan_parts, reported_loss, run_speed
from nexa_nb.text import GIB

LINES_PER_RUN = 10  # default `every`: enough to see the trend, short enough for a CI log


class ConsoleSink(Sink):
    """Writes one line per event worth reading; rank 0's steps every `every` steps.

    A step line is written for the first step of the run, every `every`-th step and the
    last step. `every=None` picks about ten lines per run. What a line needs besides its
    event (processes, memory of every rank) comes from `record`, the `RunRecord` the
    dashboard draws from too.
    """

    def __init__(self, stream=None, every: int | None = None, show_speed: bool = True, show_memory: bool = True):
        self.stream = stream if stream is not None else sys.stdout
        self.every = every
        self.show_speed = show_speed
        self.show_memory = show_memory
        self.record = RunRecord()

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def handle(self, event) -> None:
        self.record.handle(event)  # first, so a line shows the state after its event
        super().handle(event)

    def on_run_started(self, event: RunStarted) -> None:
        parts = [*plan_parts(event.plan_summary), f"{event.total_steps} steps"]
        if event.start_step:
            parts.append(f"resuming at step {event.start_step}")
        self._write("nexa: " + " | ".join(parts))
        if event.plan_summary.get("batch_search"):
            self._write(event.plan_summary["batch_search"])
        for message in event.notes:
            self._write(f"note: {message}")

    def on_step_end(self, event: StepEnd) -> None:
        record = self.record
        every = self.every or max(1, record.total_steps // LINES_PER_RUN)
        step = event.step
        if event.rank == 0 and (step == record.start_step + 1 or step % every == 0 or step == record.total_steps):
            self._write(self._step_line(event))

    def on_eval_end(self, event: EvalEnd) -> None:
        self._write(f"eval step {event.step} | {fmt_metrics(event.metrics, ' | ')}")

    def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self._write(f"checkpoint step {event.step} -> {event.path}")

    def on_note(self, event: Note) -> None:
        where = f" (rank {event.rank})" if event.rank else ""
        self._write(f"note{where}: {event.message}")

    def on_run_ended(self, event: RunEnded) -> None:
        loss = "n/a" if event.final_loss is None else f"{event.final_loss:.4f}"
        line = f"{event.status} at step {event.step}, final loss {loss}"
        message = end_message(event)
        if message:
            line += f": {message}"
        if event.checkpoint_dir:
            line += f" (checkpoint: {event.checkpoint_dir})"
        self._write(line)
        memory = self.record.measured_memory.line() if self.show_memory else None
        if memory:
            self._write(memory)

    def _step_line(self, event: StepEnd) -> str:
        """Rank 0's step, written right after the record took it."""
        parts = [f"step {event.step}/{event.total_steps}", f"loss {reported_loss(event):.4f}", f"lr {event.lr:.2e}"]
        if event.grad_norm is not None:
            parts.append(f"grad {event.grad_norm:.3f}")
        if self.show_speed:  # the whole run's rate: every rank runs the same micro-batch
            samples, tokens = run_speed(self.record)
            parts.append(f"{samples:.1f} samples/s")
            if tokens is not None:
                parts.append(f"{tokens:.0f} tokens/s")
        if self.show_memory:
            parts.append(self._memory_text())
        return " | ".join(parts)

    def _memory_text(self) -> str:
        """Device peak / capacity per rank, or host RSS when no rank has a device."""
        memory = self.record.memory
        if any(sample.capacity for sample in memory.values()):
            return "mem " + " ".join(
                f"r{rank} {s.peak / GIB:.2f}/{s.capacity / GIB:.2f} GiB" for rank, s in memory.items()
            )
        return "rss " + " ".join(f"r{rank} {s.host_rss / GIB:.2f} GiB" for rank, s in memory.items())

    def close(self) -> None:
        self.stream.flush()
