"""What the loop tells the outside: events for the sinks, the history, the trackers.

`StepReporter` turns the loop's raw figures (a step's local loss, its time, samples and
tokens) into `StepEnd` events with the loss averaged over ranks, throttles what the live
view needs only a few times a second, and keeps one history entry per optimizer step.
The figures the device computes are read without waiting for it (`DeviceReads`), so the
loop never drains the device's queue to report a step.
"""

from __future__ import annotations

import collections
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
    all-reduce already did): it cost several per cent of the step rate on CPU processes, and even
    an asynchronous one per step cost 2 % there (measured against the same run without it). So
    every rank collects its steps' losses and posts one asynchronous all-reduce for a group of
    them, in the same order on all ranks, and collects the result when it posts the next group.
    A group is as many steps as take about `GROUP_SECONDS` (at most `MAX_GROUP`), sized from the
    step time of the group before the last, which every rank has received in the same all-reduce,
    so that all ranks size their groups alike; a flush (the last step, or an evaluation or a
    save, which every rank makes at the same step) posts what was collected. Groups are formed
    on CPU processes only: there gloo's threads run each collective on the cores the training
    needs, and the group's time is on the host once `wait` returns. On a GPU an NCCL all-reduce
    per step costs a kernel launch, and reading the time would make the host wait for the
    device, so every step is posted alone. The means stay tensors on the device: `DeviceReads`
    brings them to the host.
    """

    GROUP_SECONDS = 0.25
    MAX_GROUP = 32

    def __init__(self, world: int):
        self.world = world
        self.group = self.next_group = 1
        self.collected: list[tuple[torch.Tensor, float, Any]] = []
        self.pending: tuple[torch.Tensor, Any, list] | None = None

    def add(self, local: torch.Tensor, seconds: float, payload: Any, *, flush: bool) -> list[tuple[torch.Tensor, Any]]:
        """Collect this step's `local` loss (its step took `seconds`); post the group when it is
        full or on `flush`. Returns the (mean, payload) of the steps whose mean has come back."""
        self.collected.append((local.detach().float(), seconds, payload))
        if len(self.collected) < self.group and not flush:
            return []
        finished = self.finish()
        totals = torch.stack([loss for loss, _, _ in self.collected])  # a new tensor: the all-reduce sums in place
        if self.world > 1 and totals.device.type == "cpu":  # the group's time rides along, to size the next groups
            totals = torch.cat([totals, torch.tensor([sum(s for _, s, _ in self.collected)])])
        work = None
        if self.world > 1:
            import torch.distributed as dist

            work = dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True)
        self.pending = (totals, work, [payload for _, _, payload in self.collected])
        self.collected = []
        # Here, and not where the time is read (which may be sooner on one rank than another):
        # every rank has read the same time by now, and changes its group at the same step.
        self.group = self.next_group
        return finished

    def finish(self) -> list[tuple[torch.Tensor, Any]]:
        """The posted group's (mean, payload) pairs, in step order; [] when none is posted.

        With gloo (CPU) `wait` blocks until the all-reduce is done; with NCCL it only orders the
        device's queue after it, and the host goes on.
        """
        if self.pending is None:
            return []
        totals, work, payloads = self.pending
        self.pending = None
        if work is not None:
            work.wait()
            if len(totals) > len(payloads):
                self.next_group = self._group_for(float(totals[-1]), len(payloads))
        sums = totals[: len(payloads)]
        means = sums / self.world if self.world > 1 else sums
        return [(means[i], payload) for i, payload in enumerate(payloads)]

    def _group_for(self, seconds_sum: float, steps: int) -> int:
        """Steps per group for steps that took `seconds_sum` over all ranks together."""
        step_seconds = seconds_sum / (self.world * steps)
        return max(1, min(self.MAX_GROUP, int(self.GROUP_SECONDS / step_seconds) if step_seconds > 0 else 1))


Figures = dict[str, "torch.Tensor | float | int | None"]


class DeviceReads:
    """A step's figures that the device computes (losses, gradient norm, tokens), read by the
    host without making it wait for the device.

    On a GPU, ``.item()``, ``float()`` or ``int()`` of a tensor waits until the device has run
    everything queued so far, the step just queued included: the host stops feeding the device,
    which then idles while the host prepares the next step. So `put` stacks a step's device
    tensors, copies them into pinned host memory with a non-blocking copy and records an event
    after the copy; `ready` hands back, in order, the steps whose event has passed, polled and
    never waited for unless asked (at the end, or before an evaluation or a save, which wait for
    the device anyway). On the CPU there is nothing to wait for: a step is ready at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: collections.deque = collections.deque()

    def put(self, figures: Figures, payload: Any) -> None:
        """Queue `figures` (tensors on this device, or plain numbers and None) with `payload`;
        a tensor on the host in a GPU run is read at once (there is nothing to wait for)."""
        names = [k for k, v in figures.items() if isinstance(v, torch.Tensor) and v.device.type == self.device.type]
        plain = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in figures.items() if k not in names}
        values: torch.Tensor | list[torch.Tensor] = [figures[k] for k in names]  # on the CPU: read as they are
        event = None
        if names and self.device.type == "cuda":
            # One stack, so one copy per step; float64 keeps token counts exact.
            stacked = torch.stack([v.detach().to(torch.float64) for v in values])
            values = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            values.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((names, values, event, plain, payload))

    def ready(self, wait: bool = False) -> list[tuple[dict[str, float | None], Any]]:
        """(figures as numbers, payload) of the queued steps the device has finished, oldest first;
        every queued step with `wait`."""
        done = []
        while self.pending:
            names, values, event, plain, payload = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self.pending.popleft()
            numbers = values.tolist() if isinstance(values, torch.Tensor) else [v.tolist() for v in values]
            done.append(({**plain, **dict(zip(names, numbers))}, payload))
        return done


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
        self.reads = DeviceReads(accelerator.device)
        self.grad_norm_sum, self.grad_norm_count = 0.0, 0  # of the finite norms, for their running mean
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
        """A micro-batch was trained: count its samples and tokens (a tensor, when the count is
        the attention mask's sum: it is read with the step's other figures)."""
        self.samples += self.plan.micro_batch
        n_tokens = count_tokens(batch)
        self.tokens = None if n_tokens is None else n_tokens + (0 if self.tokens is None else self.tokens)

    def step_end(self, step: int, epoch: int, local_loss: torch.Tensor, lr: float, grad_norm, *, now: bool) -> None:
        """Optimizer step `step` finished with this rank's loss `local_loss`.

        Nothing here waits for the device: the loss, its mean over ranks, the gradient norm and
        the token count are read when the device has computed them (`DeviceReads`), usually a
        step or two later. Everything is read at once when `now` (an evaluation or a save
        follows) or at the last step; the mean over ranks is collected at once when the step
        was slow (no waiting worth saving).
        """
        elapsed = time.perf_counter() - self.window_start
        if self.memory_due():
            self.memory = memory_sample(self.accelerator.device)
        report = ev.StepEnd(
            rank=self.rank,
            step=step,
            total_steps=self.total_steps,
            loss=math.nan,  # the figures read from the device are filled in by `_record`
            lr=lr,
            grad_norm=None,
            samples_per_s=self.samples / elapsed if elapsed > 0 else 0.0,
            memory=self.memory,
            epoch=epoch,
            tokens_per_s=None,
            grad_accum=self.plan.grad_accum,
            micro_batch=self.plan.micro_batch,
            accum_time_s=elapsed,
        )
        figures = {"loss": local_loss, "grad_norm": grad_norm, "tokens": self.tokens}
        last = now or step >= self.total_steps
        self._read(self.mean_loss.add(local_loss, elapsed, (figures, report), flush=last))
        if last or elapsed >= 0.25:
            self._read(self.mean_loss.finish())
        for values, read in self.reads.ready(wait=last):
            self._record(values, read)

    def _read(self, finished: list[tuple[torch.Tensor, tuple[Figures, ev.StepEnd]]]) -> None:
        """Queue the steps whose mean loss is computed for reading."""
        for mean_loss, (figures, report) in finished:
            self.reads.put({**figures, "mean_loss": mean_loss}, report)

    def _record(self, values: dict[str, float | None], report: ev.StepEnd) -> None:
        """Put a step whose figures are read into the history, the sinks and the trackers."""
        norm, tokens, elapsed = values["grad_norm"], values["tokens"], report.accum_time_s
        if norm is not None and math.isfinite(norm):
            self.grad_norm_sum, self.grad_norm_count = self.grad_norm_sum + norm, self.grad_norm_count + 1
        report = dataclasses.replace(
            report,
            loss=values["loss"],
            grad_norm=norm,
            tokens_per_s=tokens / elapsed if tokens and elapsed > 0 else None,
            mean_grad_norm=self.grad_norm_sum / self.grad_norm_count if self.grad_norm_count else None,
            mean_loss=values["mean_loss"],
        )
        self.history.append(
            {
                "step": report.step,
                "loss": report.mean_loss,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "epoch": report.epoch,
                "samples_per_s": report.samples_per_s * self.plan.procs,
            }
        )
        if self.rank == 0 or self.peer_step_due() or report.step >= self.total_steps:
            self.emit(report)
        if self.trackers:
            self.accelerator.log(
                {
                    "train/loss": report.mean_loss,
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
        """Close the trackers, whether the loop finished or not.

        Not ``accelerator.end_training()``: it also destroys the process group, which the final
        model's save still needs in several processes.
        """
        for tracker in self.accelerator.trackers if self.trackers else ():
            tracker.finish()

    def ended(self, status: str, step: int, final_loss: float | None, message: str) -> None:
        end_stream(
            self.emit_main, status, step, final_loss=final_loss, message=message, checkpoint_dir=self.last_checkpoint
        )
