"""What the loop tells the outside: events for the sinks, the history, the trackers.

`StepReporter` turns the loop's raw figures (a step's local loss, its time, samples and
tokens) into `StepEnd` events with the loss averaged over ranks, throttles what the live
view needs only a few times a second, and keeps one history entry per optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from nexa_nb import events as ev
from nexa_nb.engine.batches import count_tokens
from nexa_nb.engine.outcome import end_stream
from nexa_nb.engine.state import TrainState
from nexa_nb.plan import Plan


class Every:
    """True at most once per `seconds`, the first time included: for what the live view shows
    but a fast loop should not pay for at every step (a pipe write, a /proc read)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last = -math.inf

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class MeanOverRanks:
    """Each step's loss averaged over the ranks, without stopping the loop for it.

    A blocking all-reduce per step waits for the slowest rank a second time (DDP's gradient
    all-reduce already did): it cost several per cent of the step rate on CPU processes. So
    every rank posts an asynchronous all-reduce at the end of each step, in the same order on
    all ranks, and collects the result at the end of the next step, when it has long arrived.
    """

    def __init__(self, world: int):
        self.world = world
        self.pending: tuple[torch.Tensor, Any, Any] | None = None

    def post(self, local: torch.Tensor, payload: Any) -> tuple[float, Any] | None:
        """Start averaging `local`; return the previous step's (mean, payload), if one waits."""
        finished = self.finish()
        total = local.detach().float().clone()
        work = None
        if self.world > 1:
            import torch.distributed as dist

            work = dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True)
        self.pending = (total, work, payload)
        return finished

    def finish(self) -> tuple[float, Any] | None:
        """The pending step's (mean, payload), waiting for it if needed; None when none waits."""
        if self.pending is None:
            return None
        total, work, payload = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        return (total / self.world).item(), payload


def memory_sample(device: torch.device) -> ev.MemorySample:
    import psutil

    rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        return ev.MemorySample(
            allocated=torch.cuda.memory_allocated(device),
            reserved=torch.cuda.memory_reserved(device),
            peak=torch.cuda.max_memory_allocated(device),
            capacity=torch.cuda.get_device_properties(device).total_memory,
            host_rss=rss,
        )
    return ev.MemorySample(host_rss=rss)


class StepReporter:
    """One rank's reports. Every rank sends its steps and micro-steps; rank 0 alone sends the
    rest, and only rank 0's history and evaluations reach the caller."""

    def __init__(self, emit: Callable[[ev.Event], None], accelerator, plan: Plan, total_steps: int, state: TrainState):
        self.emit = emit
        self.emit_main = emit if accelerator.is_main_process else (lambda e: None)
        self.accelerator = accelerator
        self.plan = plan
        self.rank = accelerator.process_index
        self.total_steps = total_steps
        self.history = state.history
        self.trackers = bool(plan.config.trackers)
        # The dashboard redraws a few times a second: memory, micro-step progress and the other
        # ranks' steps need no more. Rank 0 reports every step (the console prints some of them).
        self.memory_due, self.micro_step_due, self.peer_step_due = Every(0.5), Every(0.25), Every(0.25)
        self.memory: ev.MemorySample | None = None
        self.mean_loss = MeanOverRanks(accelerator.num_processes)
        self.grad_norms: list[float] = []
        self.eval_metrics: dict[str, float] = {}
        self.last_checkpoint: str | None = None
        self.start_window()

    def started(self, task_name: str, distributed_type: str, start_step: int) -> None:
        summary = self.plan.summary()
        if self.trackers:
            self.accelerator.init_trackers(task_name, config={k: v for k, v in summary.items() if v is not None})
        self.emit_main(
            ev.RunStarted(
                plan_summary=summary,
                total_steps=self.total_steps,
                num_processes=self.accelerator.num_processes,
                distributed_type=distributed_type,
                notes=self.plan.notes,
                start_step=start_step,
            )
        )

    def start_window(self) -> None:
        """Start timing the next optimizer step (its micro-batches, samples and tokens)."""
        self.window_start = time.perf_counter()
        self.samples, self.tokens = 0, None

    def micro_step(self, step: int, micro: int) -> None:
        """Micro-batch `micro` of optimizer step `step` is about to train."""
        if self.plan.grad_accum > 1 and self.micro_step_due():
            self.emit(ev.MicroStep(rank=self.rank, step=step, micro=micro, of=self.plan.grad_accum))

    def trained(self, batch) -> None:
        """A micro-batch was trained: count its samples and tokens."""
        self.samples += self.plan.micro_batch
        n_tokens = count_tokens(batch)
        self.tokens = None if n_tokens is None else (self.tokens or 0) + n_tokens

    def step_end(self, step: int, epoch: int, local_loss: torch.Tensor, lr: float, grad_norm, *, now: bool) -> None:
        """Optimizer step `step` finished with this rank's loss `local_loss`.

        Its mean over ranks is reported at the next step, or at once when `now` (an evaluation
        or a save follows), when the step was slow (no waiting worth saving) or the last one.
        """
        elapsed = time.perf_counter() - self.window_start
        norm = float(grad_norm) if grad_norm is not None else None
        if norm is not None and math.isfinite(norm):
            self.grad_norms.append(norm)
        if self.memory_due():
            self.memory = memory_sample(self.accelerator.device)
        report = ev.StepEnd(
            rank=self.rank,
            step=step,
            total_steps=self.total_steps,
            loss=local_loss.item(),
            lr=lr,
            grad_norm=norm,
            samples_per_s=self.samples / elapsed if elapsed > 0 else 0.0,
            memory=self.memory,
            epoch=epoch,
            tokens_per_s=(self.tokens / elapsed) if self.tokens and elapsed > 0 else None,
            grad_accum=self.plan.grad_accum,
            micro_batch=self.plan.micro_batch,
            accum_time_s=elapsed,
            mean_grad_norm=sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None,
        )
        self._record(self.mean_loss.post(local_loss, report))
        if now or elapsed >= 0.25 or step >= self.total_steps:
            self._record(self.mean_loss.finish())

    def _record(self, finished: tuple[float, ev.StepEnd] | None) -> None:
        """Put a step whose mean loss is known into the history, the sinks and the trackers."""
        if finished is None:
            return
        global_loss, report = finished
        self.history.append(
            {
                "step": report.step,
                "loss": global_loss,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "epoch": report.epoch,
                "samples_per_s": report.samples_per_s * self.plan.procs,
            }
        )
        if self.rank == 0 or self.peer_step_due() or report.step >= self.total_steps:
            self.emit(dataclasses.replace(report, mean_loss=global_loss))
        if self.trackers:
            self.accelerator.log(
                {
                    "train/loss": global_loss,
                    "train/lr": report.lr,
                    **({"train/grad_norm": report.grad_norm} if report.grad_norm is not None else {}),
                },
                step=report.step,
            )

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.eval_metrics = metrics
        self.emit_main(ev.EvalEnd(step=step, metrics=metrics))
        if self.history:
            self.history[-1].update({f"eval_{k}": v for k, v in metrics.items()})

    def saved(self, step: int, path: str) -> None:
        self.last_checkpoint = path
        self.emit_main(ev.CheckpointSaved(step=step, path=path))

    def close(self) -> None:
        """Close the trackers, whether the loop finished or not."""
        if self.trackers:
            self.accelerator.end_training()

    def ended(self, status: str, step: int, final_loss: float | None, message: str) -> None:
        end_stream(
            self.emit_main, status, step, final_loss=final_loss, message=message, checkpoint_dir=self.last_checkpoint
        )
