"""The Python API: `train(task, ...)` -> `TrainResult`. The magics map onto it one to one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nexa_nb.config import ConfigError, TrainConfig, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.events import Note
from nexa_nb.plan import Plan, make_plan
from nexa_nb.task import Task


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    """One dict per optimizer step: step, loss (mean over ranks), lr, grad_norm, epoch, samples_per_s."""
    final_loss: float | None
    plan: Plan
    checkpoint_dir: str | None
    distributed_type: str
    num_processes: int
    status: str = "completed"
    """"completed" or "interrupted"."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    state_dict: dict | None = field(default=None, repr=False)
    """The final weights on CPU (LoRA merged into the base model)."""
    task: Task | None = field(default=None, repr=False)
    message: str = ""

    def __repr__(self) -> str:
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        return (
            f"TrainResult({self.status}, {len(self.history)} steps, final_loss={loss}, "
            f"{self.distributed_type} x {self.num_processes}, checkpoint_dir={self.checkpoint_dir!r})"
        )

    @classmethod
    def from_outcome(cls, outcome, plan: Plan, task: Task) -> TrainResult:
        """The result of training `task` under `plan`, from the engine's `Outcome`."""
        return cls(
            history=outcome.history,
            final_loss=outcome.final_loss,
            plan=plan,
            checkpoint_dir=outcome.checkpoint_dir,
            distributed_type=outcome.distributed_type,
            num_processes=outcome.num_processes,
            status=outcome.status,
            eval_metrics=outcome.eval_metrics,
            state_dict=outcome.state_dict,
            task=task,
            message=outcome.message,
        )

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    def trained_model(self):
        """A fresh model from the task's factory (or a copy of its module) with the final weights."""
        import copy

        if self.state_dict is None or self.task is None:
            raise TrainingError("this result holds no final weights (the run did not complete)")
        model = self.task.build_model()
        if not self.task.model_is_factory():
            model = copy.deepcopy(model)
        model.load_state_dict(self.state_dict)
        return model


_last: TrainResult | None = None


def last_result() -> TrainResult | None:
    """The result of the most recent `train` (or ``%nexa_train``) in this kernel."""
    return _last


def train(
    task: Task,
    *,
    config: str | os.PathLike | None = None,
    session: Mapping[str, Any] | None = None,
    sinks: Iterable | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Train `task`; keyword options are `TrainConfig` fields (zero=3, precision="bf16", procs=2, ...).

    Options layer over ``config`` (an accelerate YAML or DeepSpeed JSON), the environment
    variables and ``session`` defaults; see `nexa_nb.config`. Bad input raises `ConfigError`
    or `TrainingError` before any process starts. ``on_plan`` sees the checked plan just
    before the workers start (the magics print it).
    """
    global _last
    from nexa_nb.launch import launch
    from nexa_nb.sinks.console import ConsoleSink

    cfg = resolve_config(config_file=config, session=session, arguments=options)
    plan = prepare(task, cfg)
    if on_plan is not None:
        on_plan(plan)
    sinks = [ConsoleSink()] if sinks is None else list(sinks)
    while True:
        saved_before = _checkpoints(plan)
        try:
            outcome = launch(plan, task, sinks)
            break
        except TrainingError as exc:
            if exc.worker_error != "OutOfMemoryError":
                raise
            plan = smaller_micro_batch(plan, exc.rank, resume=_newest(_checkpoints(plan) - saved_before))
            for sink in sinks:
                sink.handle(Note(plan.notes[-1]))
    _last = TrainResult.from_outcome(outcome, plan, task)
    return _last


def smaller_micro_batch(plan: Plan, rank: int | None, resume: str | None) -> Plan:
    """After an out-of-memory error: the same effective batch from smaller micro-batches.

    Every rank restarts with the micro-batch divided (by its smallest factor) and the
    accumulation multiplied by the same factor, so the effective batch, the learning rate
    and the meaning of the loss curve stay the same; from the run's newest checkpoint when
    it wrote one. Gives up at micro-batch 1.
    """
    micro = plan.micro_batch
    where = f" on rank {rank}" if rank is not None and plan.procs > 1 else ""
    if micro == 1:
        raise TrainingError(
            f"out of memory{where} at micro-batch 1; nothing left to split. Fix: --grad-ckpt, "
            "--zero 3 --offload cpu, more processes, a smaller model or shorter inputs",
            worker_error="OutOfMemoryError",
        )
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    cfg = replace(
        plan.config,
        batch_size=micro // factor,
        grad_accum=plan.grad_accum * factor,
        target_batch=None,
        resume=resume or plan.config.resume,
    )
    smaller = make_plan(cfg, total_params=plan.total_params, largest_layer_params=plan.largest_layer_params)
    note = (
        f"out of memory{where} at micro-batch {micro}: retrying with micro-batch {smaller.micro_batch} x "
        f"accumulation {smaller.grad_accum} (effective batch {smaller.effective_batch}, unchanged)"
        f"{', from ' + resume if resume else ''}"
    )
    return replace(smaller, notes=(*plan.notes, note))


def _checkpoints(plan: Plan) -> set[str]:
    from nexa_nb.engine.checkpoints import complete_checkpoints

    return {str(p) for p in complete_checkpoints(plan.config.ckpt_dir)} if plan.config.ckpt_dir else set()


def _newest(paths: set[str]) -> str | None:
    return max(paths) if paths else None


def prepare(task: Task, cfg: TrainConfig) -> Plan:
    """Check the task against the config in the kernel, and plan; nothing is started or written."""
    if not isinstance(task, Task):
        raise TrainingError(
            f"expected a nexa_nb.Task, got {type(task).__name__}; "
            "wrap your model and data: task = nexa_nb.Task(model, train_data)"
        )
    if cfg.num_machines > 1:  # the launcher forks every process here: never world-size copies on one machine
        raise ConfigError(
            "num_machines",
            f"a run from the notebook trains on this machine only, not on {cfg.num_machines}",
            f"write a script with %nexa_export SCRIPT --num-machines {cfg.num_machines} and start it with "
            "accelerate launch on each machine, or drop --num-machines",
        )
    total, largest = _param_counts(task)
    plan = make_plan(cfg, total_params=total, largest_layer_params=largest)
    preflight(task, plan)
    return plan


def _param_counts(task: Task) -> tuple[int | None, int | None]:
    from torch import nn

    if isinstance(task.model, nn.Module):
        from nexa_nb.memory import count_params

        return count_params(task.model)
    if not callable(task.model):
        raise TrainingError(
            f"Task.model must be a torch.nn.Module or a function returning one, "
            f"got {type(task.model).__name__}; pass the model, or a function that builds it"
        )
    return None, None


def preflight(task: Task, plan: Plan) -> None:
    """Catch bad data and models in the kernel, before any worker exists."""
    from torch import nn

    from nexa_nb.engine.runtime import steps_per_epoch

    data = task.train_data
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TrainingError(
            f"train_data must be a map-style dataset (with __len__ and __getitem__), "
            f"got {type(data).__name__}; wrap an iterable in a list or a torch Dataset"
        )
    if len(data) == 0:
        raise TrainingError("train_data is empty; give the task at least one batch of samples")
    steps_per_epoch(len(data), plan)
    batch = _first_batch(task, plan.micro_batch)
    if task.eval_data is not None and not (hasattr(task.eval_data, "__len__") and len(task.eval_data) > 0):
        raise TrainingError("eval_data is empty or has no length; pass a non-empty dataset or None")
    if isinstance(task.model, nn.Module):
        _check_forward(task, batch)
    if plan.config.resume:
        _check_resume(plan)


def _first_batch(task: Task, size: int):
    import torch
    from torch.utils.data import default_collate

    try:
        samples = [task.train_data[i] for i in range(size)]
    except Exception as exc:
        raise TrainingError(
            f"reading train_data[0:{size}] failed ({type(exc).__name__}: {exc}); fix the dataset's __getitem__"
        ) from None
    collate = task.collate_fn or default_collate
    try:
        batch = collate(samples)
    except Exception as exc:
        raise TrainingError(
            f"collating {size} samples failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"samples are {type(samples[0]).__name__}: return tensors, numbers, or dicts/tuples of them, "
            "or pass Task(collate_fn=...)"
        ) from None

    def ok(x) -> bool:
        if isinstance(x, torch.Tensor):
            return True
        if isinstance(x, Mapping):
            return len(x) > 0 and all(ok(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return len(x) > 0 and all(ok(v) for v in x)
        return False

    if not ok(batch):
        raise TrainingError(
            f"a batch must be a tensor or a dict/tuple of tensors, but the collate step gave "
            f"{type(batch).__name__}; return tensors from the dataset or pass Task(collate_fn=...)"
        )
    return batch


def _check_forward(task: Task, batch) -> None:
    """One no-grad forward of the first batch: catches wrong inputs and a missing loss up front."""
    import torch

    from nexa_nb.engine.batches import default_forward, extract_loss

    model = task.model
    was_training = model.training
    try:
        with torch.no_grad():
            outputs = (task.forward or default_forward)(model, batch)
            extract_loss(outputs, batch, task.loss_fn)
    except TrainingError:
        raise
    except torch.OutOfMemoryError:
        pass  # the kernel's memory is not the workers' devices: the run adapts its micro-batch
    except Exception as exc:
        raise TrainingError(
            f"the model's forward failed on the first batch ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check that the dataset's samples "
            "match the model's inputs, or pass Task(forward=...)"
        ) from None
    finally:
        model.train(was_training)


def _check_resume(plan: Plan) -> None:
    from nexa_nb.engine.checkpoints import check_resumable, read_checkpoint_state, resume_path

    check_resumable(read_checkpoint_state(resume_path(plan.config)), plan)


__all__ = ["ConfigError", "TrainResult", "TrainingError", "last_result", "prepare", "train"]
