"""``--batch-size auto``: the largest micro-batch that fits, found by trying sizes before training.

The kernel starts a short launch of the workers (`nexa_nb.api.auto_micro_batch`) in the run's own set-up
(DDP or ZeRO 0-3, offload, precision) at micro-batch 1. Every rank then trains one micro-batch
of each size tried (`try_micro_batches`): real samples from the training data, one forward,
backward and optimizer step, so that the peak holds the gradients and the optimizer state as
a training step does. A size fits when no rank ran out of memory and every rank's peak stayed
within the budget (`nexa_nb.plan.memory_budget_bytes`); the ranks agree on each answer with an
all-reduce (MIN), so they try the same sizes in the same order. Sizes double from the smallest
candidate, then bisection runs between the last fit and the first miss.

The launch's workers end with it: nothing of the trials (weights, optimizer steps, DeepSpeed's
counters) reaches the real run, which starts afresh with the chosen micro-batch.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nexa_nb.text import format_bytes

STREAM_LIMIT = 1024  # the largest micro-batch tried on a stream without --target-batch: its length is unknown


@dataclass(frozen=True)
class Trial:
    size: int
    fit: bool
    peak_bytes: int
    """The largest peak over the ranks: device memory on a GPU, the process's resident memory on a CPU."""
    out_of_memory: bool = False

    @property
    def verdict(self) -> str:
        return "fits" if self.fit else "out of memory" if self.out_of_memory else "over"

    def progress(self, budget_bytes: int) -> str:
        """The line said as soon as this size has been tried: a search takes a few seconds a size."""
        return (
            f"batch size auto: micro-batch {self.size} {self.verdict} "
            f"({format_bytes(self.peak_bytes)} of {format_bytes(budget_bytes)} per process)"
        )


@dataclass
class BatchSearch:
    """What --batch-size auto tried, in order, and chose (None when not even the smallest size fit)."""

    budget_bytes: int
    trials: list[Trial] = field(default_factory=list)
    chosen: int | None = None

    def line(self) -> str:
        """One line for the plan and the end-of-run summary."""
        tried = ", ".join(f"{t.size} {t.verdict} ({format_bytes(t.peak_bytes)})" for t in self.trials)
        budget = format_bytes(self.budget_bytes)
        return f"batch size auto: tried {tried} against a budget of {budget} per process; chose {self.chosen}"

    def as_dict(self) -> dict:
        return {
            "line": self.line(),
            "budget_bytes": self.budget_bytes,
            "chosen": self.chosen,
            "tried": [{"size": t.size, "fit": t.fit, "peak_bytes": t.peak_bytes} for t in self.trials],
        }


def candidate_sizes(samples: int | None, world: int, target_batch: int | None, grad_accum: int) -> tuple[int, ...]:
    """The micro-batches worth trying, ascending.

    With a target batch, the micro-batch must divide each process's share of it (the accumulation
    is target / (micro x processes)); without one, an optimizer step (micro x accumulation x
    processes) must fit in the data, or in `STREAM_LIMIT` for a stream (`samples` None).
    """
    if target_batch is not None:
        share = target_batch // world
        return tuple(d for d in range(1, share + 1) if share % d == 0)
    bound = STREAM_LIMIT if samples is None else samples // (world * grad_accum)
    return tuple(range(1, max(bound, 1) + 1))


def search_sizes(sizes: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of `sizes` (ascending) that `fits`, assuming every smaller one fits too: sizes
    double from the first until one misses, then bisection between the last fit and that miss."""
    fit, miss = -1, len(sizes)  # indices: the largest known fit, the smallest known miss
    i = 0
    while i < miss:
        if not fits(sizes[i]):
            miss = i
            break
        fit = i
        i = max(bisect.bisect_right(sizes, 2 * sizes[i]) - 1, i + 1)
    while miss - fit > 1:
        middle = (fit + miss) // 2
        if fits(sizes[middle]):
            fit = middle
        else:
            miss = middle
    return sizes[fit] if fit >= 0 else None


def try_micro_batches(plan, task, emit) -> BatchSearch:
    """In each rank of a search launch: set up as the run will, then try `plan.batch_trials`;
    rank 0 `emit`s a `Note` after each size."""
    import torch

    from nexa_nb.engine.host_memory import keep_freed_memory
    from nexa_nb.engine.runtime import setup
    from nexa_nb.events import Note

    rt = setup(plan, task)
    keep_freed_memory()  # the C allocator as the loop sets it; each trial hands back its memory (`_release`)
    rt.model.train()
    search = BatchSearch(budget_bytes=plan.trial_budget_bytes)

    def fits(size: int) -> bool:
        peak, out_of_memory = _trial(rt, task, size)
        answers = torch.tensor([int(not out_of_memory and peak <= plan.trial_budget_bytes), -peak, -out_of_memory])
        if plan.procs > 1:
            import torch.distributed as dist

            answers = answers.to(rt.accelerator.device)
            dist.all_reduce(answers, op=dist.ReduceOp.MIN)  # every rank fits; the largest peak; any out of memory
        fit, peak, out_of_memory = bool(answers[0]), -int(answers[1]), bool(answers[2])
        search.trials.append(Trial(size, fit, peak, out_of_memory))
        if rt.accelerator.is_main_process:
            emit(Note(search.trials[-1].progress(plan.trial_budget_bytes)))
        return fit

    search.chosen = search_sizes(plan.batch_trials, fits)
    return search


def _trial(rt, task, size: int) -> tuple[int, bool]:
    """One training step of `size` samples: (this rank's peak in bytes, whether it ran out of memory)."""
    import torch

    from nexa_nb.engine.batches import cast_floats, extract_loss, map_tensors

    device = rt.accelerator.device
    batch = map_tensors(lambda t: t.to(device), (task.collate_fn or _default_collate())(_samples(task, size)))
    if rt.cast_dtype is not None:
        batch = cast_floats(batch, rt.cast_dtype)
    _release(device)
    out_of_memory = False
    try:
        loss = extract_loss(rt.forward(rt.model, batch), batch, task.loss_fn)
        rt.accelerator.backward(loss)
        rt.optimizer.step()
        del loss
    except (torch.OutOfMemoryError, MemoryError):
        out_of_memory = True
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    rt.optimizer.zero_grad(set_to_none=True)
    del batch
    _release(device)
    return peak, out_of_memory


def _default_collate():
    from torch.utils.data import default_collate

    return default_collate


def _samples(task, size: int) -> list:
    """The first `size` samples of the training data, read again from its start when it is shorter."""
    data = task.train_data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return [data[i % len(data)] for i in range(size)]
    return list(itertools.islice(itertools.cycle(itertools.islice(iter(data), size)), size))


def _release(device) -> None:
    """Free what the last trial left, and start counting the peak again from here.

    On a CPU the peak is the kernel's high-water mark of this process's resident memory
    (VmHWM), which writing 5 to /proc/self/clear_refs resets to the current resident size;
    glibc is first asked to hand back the heap it keeps (malloc_trim, which the loop's
    `keep_freed_memory` does not prevent), else the last trial's freed memory would count in
    the next one's peak.
    """
    import torch

    from nexa_nb.engine.host_memory import release_freed_memory

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()  # not glibc: what it keeps counts, and the budget is met with room to spare
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024
