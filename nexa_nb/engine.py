"""The one training loop, run inside every worker process (or the kernel, for one process).

Every entry point ends here: the magics and `nexa_nb.train` through the launcher, and
exported scripts under ``accelerate launch``.  The loop is the documented Accelerate
pattern (prepare, accumulate, backward, clip, step) plus what a notebook user needs:
events for the dashboard, atomic checkpoints, an exact resume, LoRA and gradient
checkpointing.  It knows nothing about notebooks; it reports through ``emit``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nexa_nb import events as ev
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan
from nexa_nb.task import Task

STATE_FILE = "nexa_state.json"
"""Written last into a checkpoint folder: a folder without it is incomplete."""


@dataclass
class Outcome:
    """What rank 0 hands back to the caller when the loop ends."""

    status: str
    history: list[dict[str, Any]]
    final_loss: float | None
    eval_metrics: dict[str, float]
    checkpoint_dir: str | None
    distributed_type: str
    num_processes: int
    state_dict: dict[str, torch.Tensor] | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)


# --- building blocks --------------------------------------------------------------------

def build_accelerator(plan: Plan):
    """The Accelerator for this plan, checked against what the plan expects.

    On a CPU-only host, DeepSpeed needs Accelerate to use gloo without ``cpu=True``:
    ``cpu=True`` silently drops the DeepSpeed plugin, and without a backend Accelerate
    believes it runs one process while DeepSpeed sees the whole world (its
    ``train_batch_size`` check then fails).  Passing the backend explicitly fixes both.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    kwargs = dict(plan.accelerator_kwargs)
    handlers = []
    if plan.deepspeed_config is not None:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(plan.deepspeed_config))
        if plan.device == "cpu":
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if plan.config.find_unused_parameters and plan.deepspeed_config is None:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if "project_dir" in kwargs:
        kwargs["project_config"] = ProjectConfiguration(project_dir=kwargs.pop("project_dir"))
    accelerator = Accelerator(
        **kwargs,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=plan.config.seed),
        step_scheduler_with_optimizer=False,
    )
    reported = accelerator.distributed_type.value if hasattr(accelerator.distributed_type, "value") else str(accelerator.distributed_type)
    if reported != plan.distributed_type or accelerator.num_processes != plan.procs:
        raise RuntimeError(
            f"Accelerate set up {reported} with {accelerator.num_processes} process(es), but the plan is "
            f"{plan.distributed_type} with {plan.procs}: refusing to train unsynchronised copies"
        )
    return accelerator


def apply_worker_environment(plan: Plan) -> None:
    """The plan's variables, and none of those a launcher derived from another config.

    ``accelerate launch`` turns a YAML's ``deepspeed_config`` / ``fsdp_config`` into
    ``ACCELERATE_DEEPSPEED_*``, ``ACCELERATE_GRADIENT_*`` and ``FSDP_*`` variables;
    Accelerate then refuses them next to the plan's complete DeepSpeed config, or lets them
    silently override the plan's accumulation.
    """
    launcher_overrides = ("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_", "FSDP_")
    for name in [n for n in os.environ if n.startswith(launcher_overrides)]:
        del os.environ[name]
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    os.environ.update(plan.worker_env)
    if "mlflow" in plan.config.trackers:
        # Offline unless the user points MLflow at a server: a file store beside the other logs.
        if "MLFLOW_TRACKING_URI" not in os.environ:
            store = Path(plan.accelerator_kwargs["project_dir"]).absolute() / "mlruns"
            os.environ["MLFLOW_TRACKING_URI"] = store.as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no SQL store


def enable_gradient_checkpointing(model: torch.nn.Module) -> str:
    """Transformers models use their own switch; any other module checkpoints each child."""
    if hasattr(model, "gradient_checkpointing_enable") and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
        return "transformers"
    from torch.utils.checkpoint import checkpoint

    def checkpointed(forward, *args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    wrapped = 0
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            # Patching the instance's forward keeps parameter names (and checkpoints) unchanged.
            child.forward = functools.partial(checkpointed, child.forward)
            wrapped += 1
    if wrapped == 0:
        raise TrainingError("gradient checkpointing found no sub-module to checkpoint; "
                            "drop --grad-ckpt or split the model into child modules")
    return f"{wrapped} child modules"


def apply_lora(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    c = plan.config
    targets = list(c.lora_target_modules) if c.lora_target_modules else None
    task_type = None
    cls = type(model).__name__
    for suffix, kind in (("ForTokenClassification", TaskType.TOKEN_CLS), ("ForSequenceClassification", TaskType.SEQ_CLS),
                         ("ForCausalLM", TaskType.CAUSAL_LM), ("ForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM)):
        if cls.endswith(suffix):
            task_type = kind
    if targets is None and not hasattr(model, "config"):
        # A plain module: adapt every linear layer.
        targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        if not targets:
            raise TrainingError("--lora found no nn.Linear layer to adapt; pass lora_target_modules=[...]")
    config = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                        target_modules=targets, task_type=task_type)
    return get_peft_model(model, config)


def make_scheduler(optimizer, plan: Plan, total_steps: int):
    c = plan.config
    warm = c.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if c.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if c.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, plan: Plan):
    c = plan.config
    if plan.uses_deepspeed and c.offload_optimizer != "none":
        # ZeRO-Offload steps on the host: DeepSpeed insists on its own CPU Adam there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=plan.lr, weight_decay=c.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=c.weight_decay)


def default_forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch[:-1])
    return model(batch)


def extract_loss(outputs, batch, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    elif isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        loss = outputs
    elif isinstance(outputs, dict) and outputs.get("loss") is not None:
        loss = outputs["loss"]
    elif getattr(outputs, "loss", None) is not None:
        loss = outputs.loss
    else:
        raise TrainingError(
            f"the model returned {type(outputs).__name__} with no loss; pass Task(loss_fn=...) "
            "or give the model labels so that its output has .loss")
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TrainingError(f"the loss must be a scalar tensor, got {type(loss).__name__}"
                            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}; "
                            "reduce it with .mean() in loss_fn")
    return loss


def cast_floats(batch, dtype):
    """DeepSpeed bf16/fp16 engines do not autocast inputs: cast floating tensors to the model's dtype."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


def count_tokens(batch) -> int | None:
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
    return None


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Names and shapes of every parameter: enough to tell another model's checkpoint apart."""
    import hashlib

    shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return {"params": sum(p.numel() for p in model.parameters()),
            "digest": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


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
            allocated=torch.cuda.memory_allocated(device), reserved=torch.cuda.memory_reserved(device),
            peak=torch.cuda.max_memory_allocated(device),
            capacity=torch.cuda.get_device_properties(device).total_memory, host_rss=rss)
    return ev.MemorySample(host_rss=rss)


# --- checkpoints --------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first. A folder without its state file is a torn save."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise TrainingError(f"{path} is not a complete nexa_nb checkpoint (no {STATE_FILE}); "
                            "pass a folder written by a finished save, or --resume latest")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError:
        raise TrainingError(f"{state_file} is corrupt; resume from an earlier checkpoint") from None


def save_checkpoint(accelerator, ckpt_dir: str, step: int, state: dict[str, Any]) -> str:
    """Save atomically: write into a temporary folder, then rename it into place.

    An interrupted save leaves only a ``.tmp-`` folder, which is never taken by resume.
    """
    final = Path(ckpt_dir) / checkpoint_name(step)
    tmp = Path(ckpt_dir) / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return str(final)


# --- the loop -----------------------------------------------------------------------------

def run(plan: Plan, task: Task, emit: Callable[[ev.Event], None]) -> Outcome:
    """Train `task` as `plan` says, in this process (one rank of the run)."""
    from accelerate.utils import set_seed

    c = plan.config
    apply_worker_environment(plan)
    accelerator = build_accelerator(plan)
    rank = accelerator.process_index
    set_seed(c.seed)

    model = task.build_model()
    if c.grad_ckpt:
        enable_gradient_checkpointing(model)
    if c.lora:
        model = apply_lora(model, plan)
    fingerprint = model_fingerprint(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the model has no trainable parameter (all requires_grad=False)")
    optimizer = make_optimizer(trainable, plan)

    from torch.utils.data import DataLoader

    # Each loader draws from a generator of its own, never from the global RNG that dropout uses:
    # a DataLoader takes a seed from its generator at every new iterator, and a resumed run
    # creates one where the uninterrupted run did not, so drawing from the global RNG would
    # shift every dropout mask after a resume. The order itself comes from Accelerate's
    # seedable sampler: a function of (seed, epoch).
    loader = DataLoader(task.train_data, batch_size=plan.micro_batch, shuffle=True,
                        collate_fn=task.collate_fn, drop_last=True, generator=torch.Generator().manual_seed(c.seed))
    eval_loader = None
    if task.eval_data is not None:
        eval_loader = DataLoader(task.eval_data, batch_size=plan.micro_batch, shuffle=False, collate_fn=task.collate_fn,
                                 generator=torch.Generator().manual_seed(c.seed))

    micro_per_epoch = (len(loader) // plan.procs) if plan.procs > 1 else len(loader)
    steps_per_epoch = micro_per_epoch // plan.grad_accum
    if steps_per_epoch < 1:
        raise TrainingError(
            f"one optimizer step needs {plan.effective_batch} samples but the dataset has {len(task.train_data)}; "
            "lower --batch-size, --grad-accum or --procs")
    total_steps = c.max_steps or steps_per_epoch * c.epochs
    scheduler = make_scheduler(optimizer, plan, total_steps)

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    distributed_type = accelerator.distributed_type.value
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cast_dtype = model_dtype if plan.uses_deepspeed and model_dtype in (torch.bfloat16, torch.float16) else None
    forward = task.forward or default_forward

    history: list[dict[str, Any]] = []
    step = 0
    if c.resume:
        resume_path = _resume_path(c)
        state = read_checkpoint_state(resume_path)
        _check_resumable(state, plan)
        if state.get("model") not in (None, fingerprint):
            raise TrainingError(
                f"{resume_path} holds another model ({state['model']['params']:,} parameters) than this task "
                f"({fingerprint['params']:,}); resume with the task and LoRA settings that wrote it, or drop --resume")
        accelerator.load_state(str(resume_path))
        step = state["step"]
        # Accelerate counts micro-steps to find accumulation boundaries; after an out-of-memory
        # restart the accumulation differs from the checkpoint's, so count from this run's.
        accelerator.step = step * plan.grad_accum
        history = state.get("history", [])

    if c.trackers:
        accelerator.init_trackers(task.name, config={k: v for k, v in plan.summary().items() if v is not None})

    emit_main = emit if accelerator.is_main_process else (lambda e: None)
    emit_main(ev.RunStarted(plan_summary=plan.summary(), total_steps=total_steps, num_processes=accelerator.num_processes,
                            distributed_type=distributed_type, notes=plan.notes, start_step=step))

    status, message, checkpoint_dir = "completed", "", None
    last_saved = None
    eval_metrics: dict[str, float] = {}
    grad_norms: list[float] = []
    # The dashboard redraws a few times a second: memory, micro-step progress and the other
    # ranks' steps need no more. Rank 0 reports every step (the console prints some of them).
    memory_due, micro_step_due, peer_step_due = Every(0.5), Every(0.25), Every(0.25)
    memory = None
    mean_loss = MeanOverRanks(accelerator.num_processes)

    def record(finished: tuple[float, ev.StepEnd] | None) -> None:
        """Put a step whose mean loss is known into the history, the sinks and the trackers."""
        if finished is None:
            return
        global_loss, report = finished
        history.append({"step": report.step, "loss": global_loss, "lr": report.lr, "grad_norm": report.grad_norm,
                        "epoch": report.epoch, "samples_per_s": report.samples_per_s * plan.procs})
        if rank == 0 or peer_step_due() or report.step >= total_steps:
            emit(dataclasses.replace(report, mean_loss=global_loss))
        if c.trackers:
            accelerator.log({"train/loss": global_loss, "train/lr": report.lr,
                             **({"train/grad_norm": report.grad_norm} if report.grad_norm is not None else {})},
                            step=report.step)

    def ckpt_state():
        return {"step": step, "procs": plan.procs, "zero": c.zero, "micro_batch": plan.micro_batch,
                "grad_accum": plan.grad_accum, "history": history, "task": task.name, "model": fingerprint}

    try:
        model.train()
        while step < total_steps:
            epoch = step // steps_per_epoch
            skip_micro = (step % steps_per_epoch) * plan.grad_accum
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip_micro) if skip_micro else loader
            micro = skip_micro
            cycle_start = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            samples, tokens = 0, None
            for batch in epoch_loader:
                if micro >= steps_per_epoch * plan.grad_accum or step >= total_steps:
                    break
                micro += 1
                k = (micro - 1) % plan.grad_accum + 1
                if plan.grad_accum > 1 and micro_step_due():
                    emit(ev.MicroStep(rank=rank, step=step + 1, micro=k, of=plan.grad_accum))
                if cast_dtype is not None:
                    batch = cast_floats(batch, cast_dtype)
                with accelerator.accumulate(model):
                    outputs = forward(model, batch)
                    loss = extract_loss(outputs, batch, task.loss_fn)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable if not plan.uses_deepspeed else model.parameters(),
                                                                c.clip_norm or float("inf"))
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                loss_sum += loss.detach().float()
                samples += plan.micro_batch
                n_tokens = count_tokens(batch)
                tokens = None if n_tokens is None else (tokens or 0) + n_tokens
                if k < plan.grad_accum:
                    continue

                step += 1
                local_loss = loss_sum / plan.grad_accum
                elapsed = time.perf_counter() - cycle_start
                norm = float(grad_norm) if grad_norm is not None else None
                if norm is not None and math.isfinite(norm):
                    grad_norms.append(norm)
                if memory_due():
                    memory = memory_sample(accelerator.device)
                report = ev.StepEnd(
                    rank=rank, step=step, total_steps=total_steps, loss=local_loss.item(),
                    lr=scheduler.get_last_lr()[0], grad_norm=norm, samples_per_s=samples / elapsed if elapsed > 0 else 0.0,
                    tokens_per_s=(tokens / elapsed) if tokens and elapsed > 0 else None, memory=memory, epoch=epoch,
                    grad_accum=plan.grad_accum, micro_batch=plan.micro_batch, accum_time_s=elapsed,
                    mean_grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else None)
                evaluating = bool(c.eval_every and eval_loader is not None and step % c.eval_every == 0
                                  and step < total_steps)
                saving = bool(c.ckpt_dir and c.ckpt_every and step % c.ckpt_every == 0)
                record(mean_loss.post(local_loss, report))
                if elapsed >= 0.25 or step >= total_steps or evaluating or saving:
                    record(mean_loss.finish())  # no waiting worth saving: report it now
                if evaluating:
                    eval_metrics = evaluate(accelerator, model, eval_loader, task, forward, cast_dtype)
                    emit_main(ev.EvalEnd(step=step, metrics=eval_metrics))
                    history[-1].update({f"eval_{k}": v for k, v in eval_metrics.items()})
                if saving:
                    last_saved = save_checkpoint(accelerator, c.ckpt_dir, step, ckpt_state())
                    emit_main(ev.CheckpointSaved(step=step, path=last_saved))
                cycle_start = time.perf_counter()
                loss_sum = torch.zeros((), device=accelerator.device)
                samples, tokens = 0, None
        if eval_loader is not None:
            eval_metrics = evaluate(accelerator, model, eval_loader, task, forward, cast_dtype)
            emit_main(ev.EvalEnd(step=step, metrics=eval_metrics))
            if history:
                history[-1].update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if c.ckpt_dir and last_saved != str(Path(c.ckpt_dir) / checkpoint_name(step)):
            last_saved = save_checkpoint(accelerator, c.ckpt_dir, step, ckpt_state())
            emit_main(ev.CheckpointSaved(step=step, path=last_saved))
        checkpoint_dir = last_saved
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted at step {step}"
        checkpoint_dir = last_saved
    except RuntimeError as exc:
        unused = _unused_parameters(exc, model)
        if unused is None:
            raise
        raise TrainingError(
            f"these parameters take no part in the loss, and DDP cannot synchronise them: {', '.join(unused)}. "
            "Fix: leave them out of the model (or set requires_grad=False on them), "
            "or pass --find-unused-parameters (find_unused_parameters=True)") from exc
    finally:
        if c.trackers:
            accelerator.end_training()

    state_dict = final_state_dict(accelerator, model, plan) if status == "completed" else None
    final_loss = history[-1]["loss"] if history else None
    emit_main(ev.RunEnded(status=status, step=step, final_loss=final_loss, message=message, checkpoint_dir=checkpoint_dir))
    return Outcome(status=status, history=history, final_loss=final_loss, eval_metrics=eval_metrics,
                   checkpoint_dir=checkpoint_dir, distributed_type=distributed_type,
                   num_processes=accelerator.num_processes, state_dict=state_dict, message=message,
                   notes=list(plan.notes))


def evaluate(accelerator, model, eval_loader, task: Task, forward, cast_dtype) -> dict[str, float]:
    """Mean eval loss over the whole (sharded) eval set, plus the task's own metrics."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in eval_loader:
            if cast_dtype is not None:
                batch = cast_floats(batch, cast_dtype)
            outputs = forward(model, batch)
            try:
                loss = extract_loss(outputs, batch, task.loss_fn)
            except TrainingError:
                loss = None
            if loss is not None:
                total += loss.float()
                count += 1
    metrics: dict[str, float] = {}
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    if count.item() > 0:
        metrics["loss"] = (total / count).item()
    if task.metrics is not None:
        # Every rank runs the metric: under ZeRO-3 a forward needs all ranks to gather weights.
        with torch.no_grad():
            metrics.update({k: float(v) for k, v in task.metrics(model, eval_loader).items()})
    model.train()
    return metrics


def final_state_dict(accelerator, model, plan: Plan) -> dict[str, torch.Tensor] | None:
    """Whole final weights on CPU for the caller (LoRA merged into the base model)."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process or state is None:
        return None
    if plan.config.lora:
        base = accelerator.unwrap_model(model)
        merged = copy.deepcopy(base).cpu().float().merge_and_unload()
        return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}
    return {k: v.detach().cpu().float().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in state.items()}


def _unused_parameters(exc: RuntimeError, model) -> list[str] | None:
    """The names behind DDP's "Parameter indices which did not receive grad for rank R: 2 3",
    or None when `exc` is another error."""
    import re

    found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", str(exc))
    if found is None:
        return None
    module = getattr(model, "module", model)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    indices = [int(i) for i in found.group(1).split()]
    listed = [names[i] for i in indices[:5] if i < len(names)]
    return listed + ([f"and {len(indices) - 5} more"] if len(indices) > 5 else [])


def _resume_path(c) -> Path:
    if c.resume == "latest":
        found = complete_checkpoints(c.ckpt_dir)
        if not found:
            raise TrainingError(f"--resume latest found no complete checkpoint in {c.ckpt_dir}; "
                                "train once with --ckpt-dir first, or drop --resume")
        return found[-1]
    return Path(c.resume)


def _check_resumable(state: dict[str, Any], plan: Plan) -> None:
    c = plan.config
    if state.get("zero") != c.zero:
        raise TrainingError(f"the checkpoint was written with ZeRO stage {state.get('zero')}, this run uses {c.zero}; "
                            f"resume with the same --zero {state.get('zero')}")
    if c.zero is not None and state.get("procs") != plan.procs:
        raise TrainingError(f"the ZeRO checkpoint was sharded over {state.get('procs')} process(es), this run has "
                            f"{plan.procs}; resume with --procs {state.get('procs')}")
