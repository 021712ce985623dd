"""The training loop: `run` sets up, resumes, fits and finishes; `fit` is the loop itself.

The loop is the documented Accelerate pattern (prepare, accumulate, backward, clip, step);
what a notebook user needs besides (events, history, trackers, checkpoints) is one call
each to the reporter or to `save_checkpoint`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nexa_nb import events as ev
from nexa_nb.engine.batches import cast_floats, extract_loss
from nexa_nb.engine.checkpoints import checkpoint_name, resume, save_checkpoint
from nexa_nb.engine.evaluation import evaluate
from nexa_nb.engine.final_model import save_final_model
from nexa_nb.engine.host_memory import keep_freed_memory
from nexa_nb.engine.outcome import Outcome
from nexa_nb.engine.reporter import StepReporter
from nexa_nb.engine.runtime import Runtime, setup
from nexa_nb.engine.state import TrainState
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan
from nexa_nb.task import Task


def run(plan: Plan, task: Task, emit: Callable[[ev.Event], None]) -> Outcome:
    """Train `task` as `plan` says, in this process (one rank of the run)."""
    if plan.batch_trials:  # --batch-size auto's search launch: try micro-batches, train nothing
        from nexa_nb.engine.auto_batch import try_micro_batches

        return try_micro_batches(plan, task, emit)
    rt = setup(plan, task)
    state = TrainState.start(plan, task.name, rt.fingerprint)
    if plan.config.resume:
        state = resume(rt.accelerator, plan, state)
    report = StepReporter(emit, rt.accelerator, plan, rt.total_steps, state)
    report.started(task.name, rt.distributed_type, state.step)
    status, message = "completed", ""
    try:
        fit(rt, plan, task, state, report)
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted at step {state.step}"
    except RuntimeError as exc:
        unused = _unused_parameters(exc, rt.model)
        if unused is None:
            raise
        raise TrainingError(
            f"these parameters take no part in the loss, and DDP cannot synchronise them: {', '.join(unused)}. "
            "Fix: leave them out of the model (or set requires_grad=False on them), "
            "or pass --find-unused-parameters (find_unused_parameters=True)"
        ) from exc
    finally:
        report.close()

    # The weights go to disk from the workers; the kernel gets the folder's name, never the tensors.
    written = status == "completed" and plan.output_dir is not None
    model_dir = save_final_model(rt.accelerator, rt.model, plan, task) if written else None
    final_loss = state.history[-1]["loss"] if state.history else None
    report.ended(status, state.step, final_loss, message)
    return Outcome(
        status=status,
        history=state.history,
        final_loss=final_loss,
        eval_metrics=report.eval_metrics,
        checkpoint_dir=report.last_checkpoint,
        distributed_type=rt.distributed_type,
        num_processes=rt.accelerator.num_processes,
        model_dir=model_dir,
        message=message,
        notes=list(plan.notes),
    )


def fit(rt: Runtime, plan: Plan, task: Task, state: TrainState, report: StepReporter) -> None:
    """Train from `state.step` to `rt.total_steps`, then evaluate and save once more."""
    c = plan.config
    accelerator, accum = rt.accelerator, plan.grad_accum
    keep_freed_memory()  # steps reuse what the previous step freed, instead of faulting in fresh pages
    rt.model.train()
    batches = stream_batches(rt, plan, state) if rt.steps_per_epoch is None else epoch_batches(rt, plan, state)
    micro = 0
    report.start_window()
    loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device: see `DeviceReads`
    for epoch, batch in batches:
        micro += 1
        k = (micro - 1) % accum + 1
        report.micro_step(state.step + 1, k)
        if rt.cast_dtype is not None:
            batch = cast_floats(batch, rt.cast_dtype)
        loss, grad_norm = train_micro_batch(rt, plan, task, batch)
        loss_sum += loss.detach().float()
        report.trained(batch)
        if k < accum:
            continue

        state.step += 1
        evaluating = bool(
            c.eval_every
            and rt.eval_loader is not None
            and state.step % c.eval_every == 0
            and state.step < rt.total_steps
        )
        saving = bool(c.ckpt_dir and c.ckpt_every and state.step % c.ckpt_every == 0)
        report.step_end(
            state.step, epoch, loss_sum / accum, rt.scheduler.get_last_lr()[0], grad_norm, now=evaluating or saving
        )
        if evaluating:
            report.evaluated(state.step, evaluate(rt, task))
        if saving:
            report.saved(state.step, save_checkpoint(accelerator, c.ckpt_dir, state))
        report.start_window()
        loss_sum = torch.zeros((), device=accelerator.device)
    if rt.eval_loader is not None:
        report.evaluated(state.step, evaluate(rt, task))
    if c.ckpt_dir and report.last_checkpoint != str(Path(c.ckpt_dir) / checkpoint_name(state.step)):
        report.saved(state.step, save_checkpoint(accelerator, c.ckpt_dir, state))


def epoch_batches(rt: Runtime, plan: Plan, state: TrainState) -> Iterator[tuple[int, Any]]:
    """(epoch, micro-batch) of map-style data from `state.step` on, while steps remain.

    A resumed run starts mid-epoch: the epoch's data order is a function of (seed, epoch),
    so skipping the micro-batches already trained continues exactly where the checkpoint was.
    """
    accum = plan.grad_accum
    while state.step < rt.total_steps:
        epoch = state.step // rt.steps_per_epoch
        micro = (state.step % rt.steps_per_epoch) * accum  # micro-batches of this epoch already trained
        rt.train_loader.set_epoch(epoch)
        batches = rt.accelerator.skip_first_batches(rt.train_loader, micro) if micro else rt.train_loader
        for batch in batches:
            if micro >= rt.steps_per_epoch * accum or state.step >= rt.total_steps:
                break
            micro += 1
            yield epoch, batch


def stream_batches(rt: Runtime, plan: Plan, state: TrainState) -> Iterator[tuple[int, Any]]:
    """(pass, micro-batch) of a stream from `state`'s position on, while steps remain.

    The position after each micro-batch goes into `state`, so a checkpoint holds the one after
    its step's last micro-batch. A state without one (step 0, or a checkpoint of map-style
    data) starts from the stream's beginning, past the samples its steps took.
    """
    position = state.stream_position or (0, state.step * plan.effective_batch)
    batches = rt.train_loader.batches(position)
    while state.step < rt.total_steps:
        state.stream_position, batch = next(batches)
        yield state.stream_position[0], batch


def train_micro_batch(rt: Runtime, plan: Plan, task: Task, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward one micro-batch; at an accumulation boundary, clip and step.

    Returns the loss and, at a boundary, the gradient norm before clipping, as tensors on the
    device: nothing here waits for the device. What the libraries wait for themselves:
    under DeepSpeed, Accelerate's ``clip_grad_norm_`` returns ``get_global_grad_norm().item()``
    and DeepSpeed checks for overflow on the host; with fp16, the gradient scaler reads its
    ``found_inf`` at every optimizer step. Plain Accelerate in fp32 or bf16 waits for nothing.
    """
    accelerator = rt.accelerator
    with accelerator.accumulate(rt.model):
        loss = extract_loss(rt.forward(rt.model, batch), batch, task.loss_fn)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            params = rt.model.parameters() if plan.uses_deepspeed else rt.trainable
            grad_norm = accelerator.clip_grad_norm_(params, plan.config.clip_norm or float("inf"))
        rt.optimizer.step()
        if accelerator.sync_gradients:
            rt.scheduler.step()
        rt.optimizer.zero_grad()
    return loss, grad_norm


def _unused_parameters(exc: RuntimeError, model) -> list[str] | None:
    """The names behind DDP's "Parameter indices which did not receive grad for rank R: 2 3",
    or None when `exc` is another error."""
    found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", str(exc))
    if found is None:
        return None
    module = getattr(model, "module", model)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    indices = [int(i) for i in found.group(1).split()]
    listed = [names[i] for i in indices[:5] if i < len(names)]
    return listed + ([f"and {len(indices) - 5} more"] if len(indices) > 5 else [])
