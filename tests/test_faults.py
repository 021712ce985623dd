"""Faults during training: out of memory, a killed worker, an interrupt. Nothing lost, nothing hung."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.errors import TrainingError
from tests.conftest import regression_task

pytestmark = pytest.mark.slow


class RefusesBigBatches(torch.nn.Module):
    """Raises a real torch.OutOfMemoryError for batches above `limit` (on `rank` only, when given),
    in the workers: the kernel's trace of the first step (fake tensors) plans its activations."""

    def __init__(self, limit: int, rank: int | None = None):
        super().__init__()
        self.limit, self.rank = limit, rank
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x):
        here = int(os.environ.get("RANK", "0"))
        traced = isinstance(x, FakeTensor)
        if x.shape[0] > self.limit and (self.rank is None or self.rank == here) and not traced:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} samples")
        return self.net(x)


def _task(limit: int, rank: int | None = None):
    task = regression_task()
    task.model = lambda: RefusesBigBatches(limit, rank)
    return task


@pytest.mark.parametrize("procs,rank", [(1, None), (2, 1)])
def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(procs, rank, quiet):
    result = nexa_nb.train(_task(limit=4, rank=rank), sinks=[quiet], procs=procs, batch_size=8, max_steps=6, lr=0.02)
    direct = nexa_nb.train(_task(limit=4), sinks=[quiet], procs=procs, batch_size=4, grad_accum=2, max_steps=6, lr=0.02)

    assert (result.plan.micro_batch, result.plan.grad_accum) == (4, 2)
    assert result.plan.effective_batch == 8 * procs
    # the retry's memory plan still counts the activations (traced at micro-batch 8, not 4: bytes apart)
    assert result.plan.activations and result.plan.planned_device_bytes is not None
    assert result.plan.planned_device_bytes == pytest.approx(direct.plan.planned_device_bytes, rel=1e-4)
    assert result.losses == pytest.approx(direct.losses, abs=1e-6)
    notes = [e.message for e in quiet.events if isinstance(e, ev.Note)]
    where = " on rank 1" if procs == 2 else ""
    assert notes[0] == (
        f"out of memory{where} at micro-batch 8: retrying with micro-batch 4 x accumulation 2 "
        f"(effective batch {8 * procs}, unchanged)"
    )


def test_out_of_memory_gives_up_at_micro_batch_one_with_the_fix(quiet):
    with pytest.raises(TrainingError, match=r"out of memory at micro-batch 1; .* Fix: --grad-ckpt"):
        nexa_nb.train(_task(limit=0), sinks=[quiet], batch_size=4, max_steps=2)


class _SlowTask:
    """A regression task whose steps take long enough to act in the middle of a run."""

    @staticmethod
    def make(step_seconds: float = 0.05):
        task = regression_task(n=512)
        base_loss = task.loss_fn

        def slow_loss(out, batch):
            time.sleep(step_seconds)
            return base_loss(out, batch)

        task.loss_fn = slow_loss
        return task


class _AtStep:
    """A sink that calls `action` once, from the drain thread, when rank 0 finishes `step`."""

    def __init__(self, step: int, action):
        self.step, self.action, self.done_at = step, action, None

    def handle(self, event):
        if isinstance(event, ev.StepEnd) and event.rank == 0 and event.step >= self.step and self.done_at is None:
            self.done_at = time.monotonic()
            self.action()

    def close(self):
        pass


def _workers():
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]


def test_a_killed_worker_fails_the_run_quickly_naming_the_rank(tmp_path, quiet):
    def kill_one():
        os.kill(_workers()[-1].pid, signal.SIGKILL)

    killer = _AtStep(5, kill_one)
    expected = r"rank [01] (killed by SIGKILL|died without reporting an error).*--resume latest"
    with pytest.raises(TrainingError, match=expected):
        nexa_nb.train(
            _SlowTask.make(), sinks=[quiet, killer], procs=2, max_steps=200, ckpt_dir=str(tmp_path), ckpt_every=2
        )
    assert time.monotonic() - killer.done_at < 30
    assert not _workers()

    resumed = nexa_nb.train(
        regression_task(n=512), sinks=[quiet], procs=2, max_steps=8, ckpt_dir=str(tmp_path), resume="latest"
    )
    started = next(e for e in quiet.events[::-1] if isinstance(e, ev.RunStarted))
    assert started.start_step >= 5 - 2  # at most one checkpoint interval lost
    assert resumed.status == "completed"


def test_an_interrupt_stops_every_worker_and_keeps_the_last_checkpoint(tmp_path, quiet):
    main = threading.main_thread()

    def interrupt():
        assert threading.current_thread() is not main
        os.kill(os.getpid(), signal.SIGINT)  # what the kernel's stop button sends

    stopper = _AtStep(4, interrupt)
    result = nexa_nb.train(
        _SlowTask.make(), sinks=[quiet, stopper], procs=2, max_steps=200, ckpt_dir=str(tmp_path), ckpt_every=2
    )
    stopped = time.monotonic()

    assert result.status == "interrupted"
    assert result.message.startswith("interrupted at step")
    assert stopped - stopper.done_at < 10
    assert not _workers()
    end = [e for e in quiet.events if isinstance(e, ev.RunEnded)][-1]
    assert end.status == "interrupted"
    assert result.checkpoint_dir and os.path.isdir(result.checkpoint_dir)
    # the kernel is usable: the next run works, from the kept checkpoint
    again = nexa_nb.train(
        regression_task(n=512), sinks=[quiet], procs=2, max_steps=6, ckpt_dir=str(tmp_path), resume="latest"
    )
    assert again.status == "completed"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_kernel_stops_draining_even_when_a_killed_worker_holds_the_channel_lock():
    """A worker killed by a signal inside `put` never releases the writers' lock; the kernel's
    drain must still end (it once waited on that lock for ever)."""
    import multiprocessing

    from nexa_nb.launch import EventChannel, _Drain

    fork = multiprocessing.get_context("fork")
    channel = EventChannel(fork)
    shown = []

    class Shown(ev.Sink):
        def handle(self, event):
            shown.append(event)

    def killed_mid_write():
        channel.put(["an event"])
        channel._lock.acquire()  # what a SIGKILL inside put leaves behind
        os.kill(os.getpid(), signal.SIGKILL)

    started = time.monotonic()
    with _Drain(channel, [Shown()]) as drain:
        worker = fork.Process(target=killed_mid_write)
        worker.start()
        worker.join()
    assert time.monotonic() - started < 5 and not drain.thread.is_alive()
    assert shown == ["an event"]


def test_the_kernel_sleeps_while_the_workers_send_nothing():
    """No polling: an idle drain thread uses no CPU (it once woke 20 times a second, taking
    time from the workers of a 2-core machine)."""
    import multiprocessing

    from nexa_nb.launch import EventChannel, _Drain

    channel = EventChannel(multiprocessing.get_context("fork"))
    process = psutil.Process()
    with _Drain(channel, []):
        before = sum(process.cpu_times()[:2])
        time.sleep(1.0)
        used = sum(process.cpu_times()[:2]) - before
    assert used < 0.02
