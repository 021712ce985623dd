"""The hand-written Accelerate loops nexa_nb is compared with, and how they are started.

`hand_loop` is the loop Accelerate's documentation shows::

    accelerator = Accelerator(gradient_accumulation_steps=N)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(batch), batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

It is given what nexa_nb's engine is given: the same Task (model factory, data, loss, and the
`StepClock` forward), seed, precision, micro-batch, accumulation, AdamW settings, clip norm
and a constant learning-rate schedule; the same seedable sampler, so the data order is the
same; the same torch thread count per process (nexa_nb's launcher sets
``physical cores // processes``) and, unless ``keep_freed=False``, the same setting of the C
allocator (`nexa_nb.engine.host_memory`); and it is started as nexa_nb starts its engine (see
`run_hand_loop`). It does none of nexa_nb's extras: no per-step loss all-reduce, no events,
no memory sampling.

``sync_every_micro_step=True`` gives the loop that accumulates without ``accumulate``: every
backward all-reduces the gradients (DDP's default), and the optimizer steps every N
micro-batches. Figure 3 compares nexa_nb's accumulation with it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import socket
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_of(task, batch, model):
    """The task's loss: its ``loss_fn`` if it has one, else the model output's ``.loss``."""
    outputs = task.forward(model, batch)
    return outputs.loss if task.loss_fn is None else task.loss_fn(outputs, batch)


def hand_loop(
    task, options: dict[str, Any], sync_every_micro_step: bool = False, weights_out: str | None = None
) -> None:
    """Train `task` with the documented Accelerate loop; ``options`` are nexa_nb's TrainConfig values."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    accum = options["grad_accum"]
    accelerator = Accelerator(
        cpu=options.get("force_cpu", False),
        mixed_precision=options["precision"],
        gradient_accumulation_steps=1 if sync_every_micro_step else accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(options["seed"])
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # nexa_nb's "constant"
    loader = DataLoader(
        task.train_data, batch_size=options["batch_size"], shuffle=True, collate_fn=task.collate_fn, drop_last=True
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    clip = options["clip_norm"] or float("inf")
    micro_per_rank = options["max_steps"] * accum

    model.train()
    for i, batch in enumerate(loader):
        if i == micro_per_rank:
            break
        if sync_every_micro_step:
            loss = loss_of(task, batch, model) / accum
            accelerator.backward(loss)  # all-reduces the gradients on every micro-batch
            if (i + 1) % accum == 0:
                accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        else:
            with accelerator.accumulate(model):
                loss = loss_of(task, batch, model)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

    if weights_out and accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        torch.save({k: v.detach().cpu().float().clone() for k, v in state.items()}, weights_out)
    accelerator.wait_for_everyone()


def _worker(
    procs: int,
    task,
    options: dict[str, Any],
    sync_every_micro_step: bool,
    weights_out: str | None,
    keep_freed: bool,
    all_forked,
) -> None:
    import torch

    from nexa_nb.engine.host_memory import keep_freed_memory
    from nexa_nb.hardware import usable_cores
    from nexa_nb.plan import cpu_threads_per_process

    all_forked.wait(120)  # as nexa_nb's workers do: nothing connects before every worker is forked
    if options.get("force_cpu", False):
        # As nexa_nb's launcher does for CPU workers: the cores shared out, one share per process
        # (and OMP_NUM_THREADS said, so that Accelerate does not set it again).
        threads = cpu_threads_per_process(procs, usable_cores())
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if keep_freed:
        keep_freed_memory()  # as nexa_nb's engine does before its first step
    hand_loop(task, options, sync_every_micro_step, weights_out)


def run_hand_loop(
    task,
    options: dict[str, Any],
    sync_every_micro_step: bool = False,
    weights_out: str | None = None,
    keep_freed: bool = True,
) -> None:
    """Start `hand_loop` the way nexa_nb starts its engine: a forked process for one,
    `accelerate.notebook_launcher` (forked workers) for several."""
    from accelerate import notebook_launcher

    procs = options["procs"]
    args = (
        procs,
        task,
        options,
        sync_every_micro_step,
        weights_out,
        keep_freed,
        multiprocessing.get_context("fork").Barrier(procs),
    )
    # As nexa_nb's launcher does before forking: the workers' garbage collector then leaves
    # the objects inherited from this process alone, on both sides alike.
    gc.collect()
    gc.freeze()
    try:
        if procs == 1:
            process = multiprocessing.get_context("fork").Process(target=_worker, args=args)
            process.start()
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"the hand-written loop failed (exit code {process.exitcode})")
        else:
            notebook_launcher(
                _worker, args=args, num_processes=procs, use_port=str(free_port()), master_addr="127.0.0.1"
            )
    finally:
        gc.unfreeze()
