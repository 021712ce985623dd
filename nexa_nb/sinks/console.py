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

from nexa_nb.events import CheckpointSaved, EvalEnd, Note, RunEnded, RunStarted, StepEnd
from nexa_nb.sinks.render import end_message, fmt_metrics, plan_parts

LINES_PER_RUN = 10  # default `every`: enough to see the trend, short enough for a CI log


class ConsoleSink:
    """Writes one line per event worth reading; rank 0's steps every `every` steps.

    A step line is written for the first step of the run, every `every`-th step and the
    last step. `every=None` picks about ten lines per run.
    """

    def __init__(self, stream=None, every: int | None = None, show_speed: bool = True, show_memory: bool = True):
        self.stream = stream if stream is not None else sys.stdout
        self.every = every
        self.show_speed = show_speed
        self.show_memory = show_memory
        self._total = 0
        self._procs = 1
        self._first_step = 1
        self._every = every or 1
        self._memory: dict = {}  # rank -> last MemorySample seen

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def handle(self, event) -> None:
        if isinstance(event, RunStarted):
            self._total = event.total_steps
            self._procs = event.num_processes
            self._first_step = event.start_step + 1
            self._every = self.every or max(1, event.total_steps // LINES_PER_RUN)
            parts = [*plan_parts(event.plan_summary), f"{event.total_steps} steps"]
            if event.start_step:
                parts.append(f"resuming at step {event.start_step}")
            self._write("nexa: " + " | ".join(parts))
            for message in event.notes:
                self._write(f"note: {message}")
        elif isinstance(event, StepEnd):
            self._memory[event.rank] = event.memory
            step = event.step
            if event.rank == 0 and (
                step == self._first_step or step % self._every == 0 or step == self._total
            ):
                self._write(self._step_line(event))
        elif isinstance(event, EvalEnd):
            self._write(f"eval step {event.step} | {fmt_metrics(event.metrics, ' | ')}")
        elif isinstance(event, CheckpointSaved):
            self._write(f"checkpoint step {event.step} -> {event.path}")
        elif isinstance(event, Note):
            where = f" (rank {event.rank})" if event.rank else ""
            self._write(f"note{where}: {event.message}")
        elif isinstance(event, RunEnded):
            loss = "n/a" if event.final_loss is None else f"{event.final_loss:.4f}"
            line = f"{event.status} at step {event.step}, final loss {loss}"
            message = end_message(event)
            if message:
                line += f": {message}"
            if event.checkpoint_dir:
                line += f" (checkpoint: {event.checkpoint_dir})"
            self._write(line)

    def _step_line(self, event: StepEnd) -> str:
        loss = event.loss if event.mean_loss is None else event.mean_loss
        parts = [f"step {event.step}/{event.total_steps}", f"loss {loss:.4f}", f"lr {event.lr:.2e}"]
        if event.grad_norm is not None:
            parts.append(f"grad {event.grad_norm:.3f}")
        if self.show_speed:  # the whole run's rate: every rank runs the same micro-batch
            parts.append(f"{event.samples_per_s * self._procs:.1f} samples/s")
            if event.tokens_per_s is not None:
                parts.append(f"{event.tokens_per_s * self._procs:.0f} tokens/s")
        if self.show_memory:
            parts.append(self._memory_text())
        return " | ".join(parts)

    def _memory_text(self) -> str:
        """Device peak / capacity per rank, or host RSS when no rank has a device."""
        gib = 2**30
        if any(sample.capacity for sample in self._memory.values()):
            rows = (f"r{rank} {s.peak / gib:.2f}/{s.capacity / gib:.2f} GiB" for rank, s in sorted(self._memory.items()))
            return "mem " + " ".join(rows)
        return "rss " + " ".join(f"r{rank} {s.host_rss / gib:.2f} GiB" for rank, s in sorted(self._memory.items()))

    def close(self) -> None:
        self.stream.flush()
