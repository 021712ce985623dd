"""The Python API: `train(task, ...)` -> `TrainResult`. The magics map onto it one to one."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nexa_nb.config import ConfigError, TrainConfig, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.events import Note
from nexa_nb.plan import Plan, make_plan, resolve_output_dir
from nexa_nb.task import Task
from nexa_nb.text import format_bytes


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
    """"completed", "interrupted" or "failed"."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    """The folder the workers wrote the trained model into (the plan's output_dir); None unless completed."""
    task: Task | None = field(default=None, repr=False)
    message: str = ""
    error: str = ""
    """Why a failed run failed: the error `train` raised."""
    traceback: str = field(default="", repr=False)
    """The failing worker's traceback, when a worker failed."""
    run_dir: str | None = None
    """The run's record (`nexa_nb.runs`): plan, events, this result, the workers' logs."""
    logs: list[str] = field(default_factory=list)
    """The workers' log files, in the record."""
    batch_search: dict[str, Any] | None = None
    """With --batch-size auto: the budget, each size tried ({"size", "fit", "peak_bytes"}), the one chosen
    and a "line" saying so; None when the micro-batch was given."""

    @property
    def accumulation_stats(self):
        """`nexa_nb.accumulation.AccumulationStats` of rank 0 over the run's steps (mean gradient
        norm, mean and peak memory, mean time per accumulation cycle, optimizer and micro-steps),
        from the run's record; None without one."""
        from nexa_nb.accumulation import accumulation_stats
        from nexa_nb.runs import Run

        return accumulation_stats(Run(self.run_dir).events()) if self.run_dir else None

    @property
    def memory(self):
        """`nexa_nb.memory.MeasuredMemory` of each rank: the plan's bytes per device, the most the rank
        was seen using, and their ratio; from the run's record, [] without one."""
        from nexa_nb.memory import measured_memory
        from nexa_nb.runs import Run

        return measured_memory(Run(self.run_dir).events()) if self.run_dir else []

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
            model_dir=outcome.model_dir,
            task=task,
            message=outcome.message,
            batch_search=plan.batch_search,
        )

    @classmethod
    def failed(cls, error: BaseException, plan: Plan, task: Task, run_dir: str | None) -> TrainResult:
        """The result of a run that raised `error`: the history up to the failure, from its record."""
        from nexa_nb import runs

        history = runs.history_of(runs.Run(run_dir).events()) if run_dir else []
        message = str(error) if isinstance(error, TrainingError) else f"{type(error).__name__}: {error}"
        return cls(
            history=history,
            final_loss=history[-1]["loss"] if history else None,
            plan=plan,
            checkpoint_dir=_newest(_checkpoints(plan)),
            distributed_type=plan.distributed_type,
            num_processes=plan.procs,
            status="failed",
            task=task,
            message=message,
            error=message,
            traceback=getattr(error, "worker_traceback", ""),
            run_dir=run_dir,
            batch_search=plan.batch_search,
        )

    @classmethod
    def from_record(cls, run) -> TrainResult:
        """The result a `runs.Run` holds, with its plan made again from the recorded configuration."""
        from nexa_nb import runs

        data = run.result()
        if data is None:
            raise TrainingError(f"run {run.name} has not ended yet; follow it with %nexa_attach {run.name}")
        names = {f.name for f in fields(cls)} - {"plan", "task"}
        return cls(plan=runs.plan_from_record(run.info()["plan"]), **{k: v for k, v in data.items() if k in names})

    def record_fields(self) -> dict[str, Any]:
        """What a run record keeps of this result: everything but the plan (kept apart) and the task."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("plan", "task")}

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    def trained_model(self, *, merge: bool = True, task: Task | None = None):
        """The trained model, loaded in this kernel from `model_dir`, on the CPU.

        A model of the task's (a fresh one from its factory, or a copy of its module) with the
        final weights; a transformers model through its class's ``from_pretrained``. LoRA adapters
        come merged into the base model, or with ``merge=False`` as the ``PeftModel``. A result
        read from a run record (`attach`) holds no task: pass it as `task`.
        """
        from nexa_nb.engine.final_model import load_model

        task = task or self.task
        if self.model_dir is None:
            raise TrainingError(f"this result holds no trained model (the run is {self.status}, not completed)")
        if task is None:
            raise TrainingError(
                "this result was read from a run record, which holds no task to rebuild the model from; "
                "pass it: result.trained_model(task=task)"
            )
        return load_model(self.model_dir, task, merge=merge)


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
) -> TrainResult | DetachedRun:
    """Train `task`; keyword options are `TrainConfig` fields (zero=3, precision="bf16", procs=2, ...).

    Options layer over ``config`` (an accelerate YAML or DeepSpeed JSON), the environment
    variables and ``session`` defaults; see `nexa_nb.config`. Bad input raises `ConfigError`
    or `TrainingError` before any process starts. ``on_plan`` sees the checked plan just
    before the workers start (the magics print it). Every run writes a record
    (`nexa_nb.runs`); with ``detach=True`` the run trains in a process of its own
    (`nexa_nb.detach`) and a `DetachedRun` comes back at once.
    """
    from nexa_nb.op_builds import compile_note
    from nexa_nb.runs import RunWriter, start_job, start_runner

    if isinstance(options.get("slurm"), Mapping):  # train(slurm={"partition": "debug"}): read as the flag's text
        from nexa_nb.slurm import spec_text

        options = {**options, "slurm": spec_text(options["slurm"])}
    from nexa_nb.sinks.console import ConsoleSink

    cfg = resolve_config(config_file=config, session=session, arguments=options)
    sinks = [ConsoleSink()] if sinks is None else list(sinks)
    search = None
    if cfg.batch_size == "auto":
        cfg, search = auto_micro_batch(task, cfg, sinks)
    plan = replace(prepare(task, cfg), batch_search=search)
    elsewhere = cfg.detach or cfg.slurm is not None
    task_bytes = _task_bytes(task, cfg) if elsewhere else b""  # before the record: a task that cannot go writes nothing
    record = RunWriter.create(plan, task.name, where="kernel" if not elsewhere else "detached")
    plan = record.plan  # its model folder is in the record unless --output-dir or --ckpt-dir says otherwise
    if on_plan is not None:
        on_plan(plan)
    if cfg.slurm is not None:
        from nexa_nb.slurm import parse_spec

        return DetachedRun(str(record.folder), None, start_job(record, task_bytes, parse_spec(cfg.slurm)))
    if cfg.detach:
        return DetachedRun(str(record.folder), start_runner(record, task_bytes))
    compiling = compile_note(plan)
    if compiling is not None:  # the wait before the first step, said where the user looks
        for sink in sinks:
            sink.handle(Note(compiling))
    return run_recorded(plan, task, sinks, record)


def _task_bytes(task: Task, cfg: TrainConfig) -> bytes:
    """The task saved for a process of its own; a Slurm job first needs Slurm and submitit here."""
    from nexa_nb.export import task_by_value

    if cfg.slurm is not None:
        from nexa_nb.slurm import missing

        problem = missing()
        if problem:
            raise TrainingError(problem)
    return task_by_value(task)


@dataclass
class DetachedRun:
    """What ``train(..., detach=True)`` (or ``slurm=...``) returns at once: the run's record, and the
    process (or Slurm job) training it."""

    run_dir: str
    pid: int | None
    job: str | None = None

    @property
    def name(self) -> str:
        return Path(self.run_dir).name

    def status(self) -> str:
        from nexa_nb.runs import Run

        return Run(self.run_dir).status()

    def result(self, sinks: Iterable = ()) -> TrainResult:
        """Follow the run until it ends (into `sinks`, if any) and return its result."""
        return attach(self.run_dir, sinks)

    def stop(self) -> str:
        from nexa_nb.runs import stop

        return stop(self.run_dir)

    def __repr__(self) -> str:
        where = f"Slurm job {self.job}" if self.job else f"pid {self.pid}"
        return f"DetachedRun({self.name}, {where}, {self.status()}; follow it with %nexa_attach {self.name})"


def attach(name: str | os.PathLike, sinks: Iterable = (), *, root: str | os.PathLike = "nexa_runs") -> TrainResult:
    """Replay run `name`'s record (its name under `root`, or its folder) into `sinks`, follow it
    until it ends, and return its `TrainResult`: from any kernel, while it runs or after."""
    from nexa_nb import runs

    run = runs.find_run(name, root)
    runs.follow(run, sinks)
    return TrainResult.from_record(run)


def run_recorded(plan: Plan, task: Task, sinks: list, record) -> TrainResult:
    """Launch, retrying after an out-of-memory error; the result goes to the record and `last_result`.

    A failed run raises its `TrainingError` after its result (status "failed", the history
    so far, the error, the logs) is written and kept as `last_result()`.
    """
    global _last
    from nexa_nb.launch import launch
    from nexa_nb.runs import Run, history_of

    run_dir = str(record.folder)
    try:
        while True:
            saved_before = _checkpoints(plan)
            try:
                outcome = launch(plan, task, sinks, record)
                break
            except TrainingError as exc:
                if exc.worker_error != "OutOfMemoryError":
                    raise
                plan = smaller_micro_batch(plan, exc.rank, resume=_newest(_checkpoints(plan) - saved_before))
                for sink in [*sinks, record]:
                    sink.handle(Note(plan.notes[-1]))
    except BaseException as exc:  # a worker's failure, or an interrupt outside the workers' run
        _last = TrainResult.failed(exc, plan, task, run_dir)
        _last.logs = record.finish(_last.record_fields())
        raise
    _last = TrainResult.from_outcome(outcome, plan, task)
    _last.run_dir = run_dir
    if not _last.history:  # interrupted before rank 0 could send its own: what the record saw
        _last.history = history_of(Run(run_dir).events())
    _last.logs = record.finish(_last.record_fields())
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
    smaller = make_plan(
        cfg,
        total_params=plan.total_params,
        largest_layer_params=plan.largest_layer_params,
        activations=plan.activations,
    )
    note = (
        f"out of memory{where} at micro-batch {micro}: retrying with micro-batch {smaller.micro_batch} x "
        f"accumulation {smaller.grad_accum} (effective batch {smaller.effective_batch}, unchanged)"
        f"{', from ' + resume if resume else ''}"
    )
    return replace(smaller, notes=(*plan.notes, note), output_dir=plan.output_dir, batch_search=plan.batch_search)


def auto_micro_batch(task: Task, cfg: TrainConfig, sinks: list) -> tuple[TrainConfig, dict[str, Any]]:
    """--batch-size auto: `cfg` with the largest micro-batch that fits, and what was tried
    (`nexa_nb.engine.auto_batch`; `sinks` get a `Note` as each size is tried). The task is
    checked first, at micro-batch 1, as any run's is; the accumulation keeps --target-batch."""
    from nexa_nb.config import validate
    from nexa_nb.engine.auto_batch import candidate_sizes
    from nexa_nb.engine.runtime import is_stream
    from nexa_nb.launch import launch
    from nexa_nb.plan import memory_budget_bytes

    checked = prepare(task, replace(cfg, batch_size=1))
    alone = replace(
        cfg, batch_size=1, grad_accum=1, target_batch=None, resume=None, trackers=(), eval_every=None, ckpt_dir=None
    )
    samples = None if is_stream(task.train_data) else len(task.train_data)
    trials = replace(
        make_plan(alone, total_params=checked.total_params, largest_layer_params=checked.largest_layer_params),
        batch_trials=candidate_sizes(samples, checked.procs, cfg.target_batch, cfg.grad_accum),
        trial_budget_bytes=memory_budget_bytes(cfg),
    )
    search = launch(trials, task, sinks)  # each rank runs `auto_batch.try_micro_batches`; rank 0's account comes back
    if search.chosen is None:
        first = search.trials[0]
        raise TrainingError(
            f"--batch-size auto: micro-batch {first.size} already needs {format_bytes(first.peak_bytes)} per process, "
            f"more than the budget of {format_bytes(search.budget_bytes)}. Fix: --grad-ckpt, --zero 3 --offload cpu, "
            "more processes, a smaller model or shorter inputs"
            + (", or a larger --memory-budget" if cfg.memory_budget is not None else "")
        )
    micro = search.chosen
    grad_accum = cfg.target_batch // (micro * checked.procs) if cfg.target_batch is not None else cfg.grad_accum
    chosen = replace(cfg, batch_size=micro, grad_accum=grad_accum)
    validate(chosen)
    return chosen, search.as_dict()


def _checkpoints(plan: Plan) -> set[str]:
    from nexa_nb.engine.checkpoints import complete_checkpoints

    return {str(p) for p in complete_checkpoints(plan.config.ckpt_dir)} if plan.config.ckpt_dir else set()


def _newest(paths: set[str]) -> str | None:
    return max(paths) if paths else None


def prepare(task: Task, cfg: TrainConfig) -> Plan:
    """Check the task against the config in the kernel, and plan; nothing is started or written."""
    from nexa_nb.op_builds import check_nvme_offload

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
    plan = replace(
        make_plan(cfg, total_params=total, largest_layer_params=largest), output_dir=resolve_output_dir(cfg, task.name)
    )
    check_nvme_offload(plan)
    first = preflight(task, plan)
    notes = first.notes
    if cfg.resume and cfg.offload_optimizer == "nvme":
        notes += (
            "DeepSpeed resumes NVMe-offloaded optimizer state only for tensors of 1 MiB or more (those it swaps "
            "to disk); the Adam moments of smaller ones (biases, norms) start again, so the resumed curve "
            "departs slightly from an uninterrupted run after the first step",
        )
    if cfg.zero == 3 and not task.model_is_factory():
        notes += (
            "Task.model is a module, so the whole model is built in this kernel before ZeRO-3 partitions it; "
            "pass a function that builds it (Task(make_model, ...)) to build only each rank's share",
        )
    planned = make_plan(
        cfg,
        total_params=first.total_params or total,
        largest_layer_params=first.largest_layer_params or largest,
        activations=first.activations,
    )
    return replace(planned, output_dir=plan.output_dir, notes=(*planned.notes, *notes))


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


def preflight(task: Task, plan: Plan):
    """Catch bad data and models in the kernel, before any worker exists; returns what tracing
    the first step found (`nexa_nb.activations.FirstStep`)."""
    from nexa_nb.engine.runtime import is_stream, run_length

    data = task.train_data
    if not is_stream(data):
        _check_map_style(data)
    run_length(data, plan)
    samples = _first_samples(data, plan.micro_batch)
    batch = _first_batch(task, samples)
    if is_stream(task.eval_data):
        raise TrainingError(
            f"eval_data is a stream ({type(task.eval_data).__name__}); streams serve as train_data only, and "
            "eval_data must be map-style (a list, a torch Dataset or a datasets.Dataset): take the eval samples "
            "into a list, e.g. list(itertools.islice(stream, 500))"
        )
    if task.eval_data is not None and not (hasattr(task.eval_data, "__len__") and len(task.eval_data) > 0):
        raise TrainingError("eval_data is empty or has no length; pass a non-empty dataset or None")
    _check_scoring(task)
    first = _check_first_step(task, plan, samples, batch)
    if plan.config.resume:
        _check_resume(plan)
    _check_outputs(task, plan)
    return first


def _check_map_style(data) -> None:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TrainingError(
            f"train_data must be a map-style dataset (with __len__ and __getitem__) or a stream (a torch or "
            f"datasets IterableDataset), got {type(data).__name__}; wrap an iterable in a list, or in a torch "
            "IterableDataset whose __iter__ yields the samples"
        )
    if len(data) == 0:
        raise TrainingError("train_data is empty; give the task at least one batch of samples")


def _first_batch(task: Task, samples: list):
    """The first batch as the workers will build it, refused here when the default forward cannot take it."""
    from torch.utils.data import default_collate

    from nexa_nb.engine.batches import batch_problem

    size = len(samples)
    collate = task.collate_fn or default_collate
    try:
        batch = collate(samples)
    except Exception as exc:
        raise TrainingError(
            f"collating {size} samples failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"samples are {type(samples[0]).__name__}{_text_fields(samples[0])}: return tensors, numbers, or "
            "dicts/tuples/dataclasses of them, or pass Task(collate_fn=...)"
        ) from None
    problem = None if task.forward is not None else batch_problem(batch)  # a forward of the user's takes any batch
    if problem:
        raise TrainingError(
            "a batch must be a tensor or a dict/tuple of tensors (or a dataclass of them; numbers and None may sit "
            f"beside them), but {problem}; return tensors from the dataset (without text fields), "
            "pass Task(collate_fn=...) that builds them, or pass Task(forward=...) that takes the batch as it is"
        )
    return batch


def _first_samples(data, size: int) -> list:
    """The first `size` samples. A stream is read that far and no further, in an iterator of its own that is
    closed at once: the workers, forked later, iterate their own copies of the dataset from the beginning."""
    from nexa_nb.engine.runtime import is_stream

    if not is_stream(data):
        try:
            return [data[i] for i in range(size)]
        except Exception as exc:
            raise TrainingError(
                f"reading train_data[0:{size}] failed ({type(exc).__name__}: {exc}); fix the dataset's __getitem__"
            ) from None
    iterator = iter(data)
    try:
        samples = list(itertools.islice(iterator, size))
    except Exception as exc:
        raise TrainingError(
            f"reading the first {size} samples of train_data failed ({type(exc).__name__}: {exc}); "
            "fix the dataset's __iter__"
        ) from None
    finally:
        getattr(iterator, "close", lambda: None)()
    if len(samples) < size:
        raise TrainingError(
            f"train_data is a stream of {len(samples)} sample(s), fewer than one micro-batch ({size}); "
            "lower --batch-size, or give a longer stream"
        )
    return samples


def _text_fields(sample) -> str:
    """Which fields of a dict sample hold text: a column a tokenizing collator or default_collate cannot pad."""
    names = [k for k, v in sample.items() if isinstance(v, str)] if isinstance(sample, Mapping) else []
    if not names:
        return ""
    return f" with text in {', '.join(map(repr, names))} (drop it, e.g. dataset.remove_columns({names!r}))"


def _check_scoring(task: Task) -> None:
    """`predict` and `score` come together, and score eval data."""
    if (task.predict is None) != (task.score is None):
        raise TrainingError(
            "Task(predict=...) and Task(score=...) go together: predict gives per-sample tensors of each eval "
            "batch, score turns the whole eval set's into numbers; pass both, or neither"
        )
    if task.score is not None and task.eval_data is None:
        raise TrainingError("Task(score=...) scores eval_data, and the task has none; pass eval_data=...")


def _check_predictions(predictions) -> None:
    import torch

    if not isinstance(predictions, Mapping) or not predictions:
        raise TrainingError(
            f"Task.predict returned {type(predictions).__name__}; return a dict of per-sample tensors, "
            "e.g. {'prediction': outputs.logits.argmax(-1), 'label': batch['labels']}"
        )
    for name, value in predictions.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise TrainingError(
                f"Task.predict's {name!r} is {type(value).__name__}, not a tensor with one row per sample; "
                "return tensors whose first dimension is the batch"
            )


def _check_first_step(task: Task, plan: Plan, samples: list, batch):
    """The first training step on fake tensors, in a process of its own (`nexa_nb.activations`): the
    model built without memory (a factory too), one forward, loss and backward of the first batch, so
    that a known mistake in the inputs, labels or loss is one line with its fix here; and the
    activations it needs, for the memory plan.

    Other failures are not refused for it: a module gets the real no-grad forward instead (which
    refuses what fails for real), a factory is left to the workers.  The batch of twice the
    micro-batch (for the bytes per sample) repeats the first samples, collated as the first batch is."""
    from torch import nn
    from torch.utils.data import default_collate

    from nexa_nb.activations import trace_apart

    def check(outputs, batch):
        _check_predictions(task.predict(outputs, batch))

    # `predict` is meant for eval batches, which may hold more than a train batch (ids): as before,
    # it is tried on the train batch for a module only
    checks_predict = task.predict is not None and isinstance(task.model, nn.Module)
    try:
        twice = (task.collate_fn or default_collate)(samples + samples)  # padded as the first batch is
    except Exception:  # a collate_fn for one size only: the first batch's tensors are repeated instead
        twice = None
    first = trace_apart(task, plan, batch, check=check if checks_predict else None, twice=twice)
    if not first.activations and isinstance(task.model, nn.Module):
        _check_forward(task, batch)
    return first


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
            if task.predict is not None:
                _check_predictions(task.predict(outputs, batch))
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


def _check_outputs(task: Task, plan: Plan) -> None:
    """What the workers will write at the end (the model, the tokenizer) can be written: known before they start."""
    from nexa_nb.engine.final_model import is_model_folder

    tokenizer = task.tokenizer
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TrainingError(
            f"Task.tokenizer is a {type(tokenizer).__name__}, which has no save_pretrained to write it beside "
            "the model; pass a transformers tokenizer (or processor), or leave tokenizer out"
        )
    c = plan.config
    if c.merge_lora and (c.zero == 3 or c.fsdp) and not task.model_is_factory():
        raise TrainingError(
            "--merge-lora with sharded weights (ZeRO-3, FSDP) rebuilds the base model from the task's factory, "
            "but Task.model is a module; pass a function that builds the model (Task(make_model, ...))"
        )
    out = Path(plan.output_dir)
    if out.is_dir() and any(out.iterdir()) and not is_model_folder(out):
        raise TrainingError(
            f"output_dir {plan.output_dir!r} holds other files, which the trained model would replace; "
            "pass an empty or new folder to --output-dir (output_dir=...)"
        )


def _check_resume(plan: Plan) -> None:
    from nexa_nb.engine.checkpoints import check_resumable, read_checkpoint_state, resume_path

    check_resumable(read_checkpoint_state(resume_path(plan.config)), plan)


__all__ = ["ConfigError", "DetachedRun", "TrainResult", "TrainingError", "attach", "last_result", "prepare", "train"]
