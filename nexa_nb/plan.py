"""Configuration + hardware -> a resolved plan, with a note for every fallback.

The plan is what actually runs: the exact `Accelerator` arguments, a complete DeepSpeed
config (no "auto" left for DeepSpeed or Accelerate to guess), the batch arithmetic, the
learning rate after scaling, the environment each worker needs, and the memory table.
Nothing here touches a GPU or imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nexa_nb.config import ConfigError, TrainConfig
from nexa_nb.hardware import Hardware, probe
from nexa_nb.text import precision_label, strategy_description


@dataclass(frozen=True)
class Plan:
    config: TrainConfig
    device: str
    """"cuda" or "cpu": where the workers train."""
    precision: str
    """The precision that runs (after any fallback): "no", "fp16" or "bf16"."""
    procs: int
    """Processes in the whole run (procs per machine x machines)."""
    micro_batch: int
    grad_accum: int
    effective_batch: int
    """micro_batch x grad_accum x procs: samples per optimizer step."""
    lr: float
    """Learning rate after the scaling rule."""
    distributed_type: str
    """What Accelerate will report: "NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED" or "FSDP"."""
    accelerator_kwargs: dict[str, Any]
    deepspeed_config: dict[str, Any] | None
    worker_env: dict[str, str]
    notes: tuple[str, ...] = ()
    memory: tuple = ()
    """`nexa_nb.memory.StateMemory` rows, when the parameter count is known."""
    recommendation: Any = None
    total_params: int | None = None
    largest_layer_params: int | None = None
    output_dir: str | None = None
    """Where the workers write the trained model (`resolve_output_dir`); None writes nothing."""
    activations: tuple = ()
    """`nexa_nb.memory.ActivationEstimate`s of the task's first step, without and with checkpointing."""
    planned_device_bytes: int | None = None
    """What this setup needs per device (model states, framework, activations at the micro-batch), when known."""
    batch_trials: tuple[int, ...] = ()
    """Micro-batches to try instead of training (--batch-size auto's search launch), ascending; () trains."""
    trial_budget_bytes: int | None = None
    """The peak a tried micro-batch may reach on each rank (`memory_budget`)."""
    batch_search: dict[str, Any] | None = None
    """What --batch-size auto tried and chose (`nexa_nb.engine.auto_batch.BatchSearch.as_dict`, with its
    "line"); None when the micro-batch was given."""

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed_config is not None

    def summary(self) -> dict[str, Any]:
        """The few facts a header or a log line needs."""
        c = self.config
        return {
            "zero": c.zero,
            "offload_optimizer": c.offload_optimizer,
            "offload_param": c.offload_param,
            "precision": self.precision,
            "procs": self.procs,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "effective_batch": self.effective_batch,
            "lr": self.lr,
            "distributed_type": self.distributed_type,
            "device": self.device,
            "planned_memory": self.planned_device_bytes,
            "batch_search": self.batch_search["line"] if self.batch_search else None,
        }

    def describe(self) -> str:
        """A few human lines: what runs, and every fallback taken."""
        c = self.config
        strategy = strategy_description(c.zero, self.distributed_type, c.offload_optimizer, c.offload_param)
        lines = [
            f"{strategy}, {precision_label(self.precision)}, "
            f"{self.procs} x {self.device.upper()} ({self.distributed_type})",
            (
                f"batch: micro {self.micro_batch} x accumulation {self.grad_accum} x {self.procs} procs "
                f"= effective {self.effective_batch}; lr {self.lr:g}"
            ),
        ]
        lines += [self.batch_search["line"]] if self.batch_search else []
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def deepspeed_json(self) -> str:
        return json.dumps(self.deepspeed_config, indent=2) if self.deepspeed_config else "null"


def scale_lr(lr: float, rule: str, effective_batch: int, reference_batch: int) -> float:
    """The explicit learning-rate scaling rule: none, linear (Goyal et al.) or sqrt (Krizhevsky)."""
    ratio = effective_batch / reference_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    return lr


def resolve_output_dir(config: TrainConfig, task_name: str, now: datetime | None = None) -> str:
    """The folder a run writes its trained model into, decided once, in the kernel, before workers start.

    --output-dir when given; else ``<ckpt_dir>/final``; else a new ``nexa_runs/<task>-<UTC time>/model``
    (a suffix keeps two runs started in the same second apart).
    """
    if config.output_dir is not None:
        return config.output_dir
    if config.ckpt_dir is not None:
        return str(Path(config.ckpt_dir) / "final")
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    run = Path("nexa_runs") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', task_name) or 'task'}-{stamp}"
    unique, n = run, 1
    while unique.exists():
        n += 1
        unique = run.with_name(f"{run.name}-{n}")
    return str(unique / "model")


def cpu_threads_per_process(procs: int, cores: int) -> int:
    """OMP_NUM_THREADS as the user set it, else a share of the usable cores for each process:
    more threads than cores slows every rank."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    return max(1, cores // procs)


def make_plan(
    config: TrainConfig,
    hardware: Hardware | None = None,
    *,
    total_params: int | None = None,
    largest_layer_params: int | None = None,
    activations: tuple = (),
) -> Plan:
    """Resolve `config` for `hardware` (probed when not given). Raises `ConfigError`.

    `activations` (`nexa_nb.activations`' estimates of the task's first step) size the micro-batch
    in the memory plan; without them the plan counts model states only."""
    hw = checked_hardware(config, hardware)
    c, notes = at_a_micro_batch(config)

    def fallback(field_name: str, message: str, fix: str) -> None:
        if c.strict:
            raise ConfigError(field_name, message + " (strict mode)", fix)
        notes.append(message)

    on_cuda = uses_cuda(c, hw)
    device = "cuda" if on_cuda else "cpu"

    precision = precision_that_runs(c, hw, on_cuda, fallback)

    # batch arithmetic
    world = c.procs * c.num_machines
    grad_accum = c.target_batch // (c.batch_size * world) if c.target_batch is not None else c.grad_accum
    effective = c.batch_size * grad_accum * world
    reference = c.lr_reference_batch or c.batch_size
    lr = scale_lr(c.lr, c.lr_scaling, effective, reference)
    if c.lr_scaling != "none":
        notes.append(
            f"lr scaled {c.lr_scaling} from {c.lr:g} (tuned for batch {reference}) to {lr:g} for batch {effective}"
        )

    distributed_type = reported_distributed_type(c, world, on_cuda)

    accelerator_kwargs: dict[str, Any] = {
        "mixed_precision": precision,
        "gradient_accumulation_steps": grad_accum,
        # cpu=True is what makes Accelerate set up gloo for several CPU processes; it must not
        # be passed with DeepSpeed, which it silently drops (see launch.py).
        "cpu": (not on_cuda) and c.zero is None,
    }
    if c.trackers:
        accelerator_kwargs["log_with"] = list(c.trackers)
        accelerator_kwargs["project_dir"] = c.log_dir or c.ckpt_dir or "nexa_runs"

    ds_config = (
        deepspeed_config(c, precision=precision, grad_accum=grad_accum, world=world, on_cuda=on_cuda)
        if c.zero is not None
        else None
    )

    worker_env = worker_environment(c, hw, on_cuda, precision, uses_deepspeed=ds_config is not None)
    if on_cuda and c.offload_optimizer != "none" and c.zero is not None:
        notes.append("optimizer offload uses DeepSpeedCPUAdam, compiled on first use (about a minute), cached after")

    if not on_cuda and c.procs > hw.cpu_cores:
        notes.append(
            f"{c.procs} processes share {hw.cpu_cores} usable core(s): they take turns, so the run is no faster "
            f"than with --procs {hw.cpu_cores}"
        )
    memory_rows, recommendation, planned, overflow = model_state_rows(
        c,
        hw,
        on_cuda,
        total_params,
        largest_layer_params,
        activations=activations,
        grad_accum=grad_accum,
        weight_bytes=4 if precision == "no" else 2,
    )
    if overflow:
        notes.append(overflow)

    return Plan(
        config=c,
        device=device,
        precision=precision,
        procs=world,
        micro_batch=c.batch_size,
        grad_accum=grad_accum,
        effective_batch=effective,
        lr=lr,
        distributed_type=distributed_type,
        accelerator_kwargs=accelerator_kwargs,
        deepspeed_config=ds_config,
        worker_env=worker_env,
        notes=tuple(notes),
        memory=memory_rows,
        recommendation=recommendation,
        total_params=total_params,
        largest_layer_params=largest_layer_params,
        output_dir=c.output_dir,
        activations=tuple(activations),
        planned_device_bytes=planned,
    )


def at_a_micro_batch(c: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config a plan is made for, and the notes it starts with: --batch-size auto is planned at
    micro-batch 1, since only a run tries sizes (`nexa_nb.api.train`) and plans again with the one found."""
    if c.batch_size != "auto":
        return c, []
    note = (
        "--batch-size auto: planned here at micro-batch 1; %nexa_train and nexa_nb.train try sizes before "
        "training and use the largest that fits"
    )
    return replace(c, batch_size=1), [note]


def checked_hardware(c: TrainConfig, hardware: Hardware | None) -> Hardware:
    """`hardware` (probed when None), once a memory budget is known to fit in it."""
    hw = probe() if hardware is None else hardware
    if c.memory_budget is not None and hw.host_memory_bytes and c.memory_budget > hw.host_memory_bytes:
        from nexa_nb.text import format_bytes

        raise ConfigError(
            "memory_budget",
            f"{format_bytes(c.memory_budget)} is more than this machine's memory "
            f"({format_bytes(hw.host_memory_bytes)})",
            f"pass --memory-budget {hw.host_memory_bytes // 2**30}GiB or less",
        )
    return hw


def memory_budget_bytes(c: TrainConfig, hw: Hardware | None = None) -> int:
    """The peak one rank may reach: on a GPU (usage - margin) x its memory; on a CPU --memory-budget,
    else the same share of this process's part of the available host memory."""
    from nexa_nb.memory import usable_bytes

    hw = probe() if hw is None else hw
    if uses_cuda(c, hw):
        return usable_bytes(hw.device_memory_bytes, c.max_memory_usage, c.memory_safety_margin)
    if c.memory_budget is not None:
        return c.memory_budget
    return usable_bytes(hw.host_available_bytes // c.procs, c.max_memory_usage, c.memory_safety_margin)


def uses_cuda(c: TrainConfig, hw: Hardware) -> bool:
    """Whether the workers train on CUDA GPUs; refuses process counts and FSDP the machine cannot hold."""
    on_cuda = hw.has_cuda and not c.force_cpu
    if on_cuda and c.procs > len(hw.gpus):
        raise ConfigError(
            "procs",
            f"{c.procs} processes asked but this machine has {len(hw.gpus)} GPU(s)",
            f"pass --procs {len(hw.gpus)} or fewer",
        )
    if not on_cuda and c.procs > max(hw.cpu_cores, 1) * 4:
        raise ConfigError(
            "procs",
            f"{c.procs} CPU processes on {hw.cpu_cores} cores would thrash",
            f"pass --procs {hw.cpu_cores} or fewer",
        )
    if c.fsdp and not on_cuda:
        raise ConfigError(
            "fsdp", "FSDP needs CUDA GPUs and none is available", "use --zero 3 for sharding on the CPU, or run on GPUs"
        )
    return on_cuda


def precision_that_runs(c: TrainConfig, hw: Hardware, on_cuda: bool, fallback) -> str:
    """The precision asked for, or the one this hardware runs instead (through `fallback`, which notes it)."""
    if c.precision == "fp16" and not on_cuda:
        fallback(
            "precision",
            "fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead",
            "pass --bf16 or --fp32, or run on a GPU",
        )
        return "bf16"
    if c.precision == "bf16" and on_cuda and not hw.bf16_gpu:
        fallback("precision", "this GPU has no fast bf16; this run trains in fp16 instead", "pass --fp16 or --fp32")
        return "fp16"
    return c.precision


def reported_distributed_type(c: TrainConfig, world: int, on_cuda: bool) -> str:
    """What Accelerate will report: the engine refuses to train when it reports something else."""
    if c.zero is not None:
        return "DEEPSPEED"
    if c.fsdp:
        return "FSDP"
    if world > 1:
        return "MULTI_GPU" if on_cuda else "MULTI_CPU"
    return "NO"


def worker_environment(
    c: TrainConfig, hw: Hardware, on_cuda: bool, precision: str, *, uses_deepspeed: bool
) -> dict[str, str]:
    """The variables every worker sets before Accelerate starts."""
    env = {"ACCELERATE_USE_DEEPSPEED": "true" if uses_deepspeed else "false", "ACCELERATE_MIXED_PRECISION": precision}
    if c.fsdp:
        env["ACCELERATE_USE_FSDP"] = "true"
    if not on_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"  # said, not guessed: DeepSpeed warns when it has to guess
        env["OMP_NUM_THREADS"] = str(cpu_threads_per_process(c.procs, hw.cpu_cores))
    return env


def model_state_rows(
    c: TrainConfig,
    hw: Hardware,
    on_cuda: bool,
    total_params: int | None,
    largest_layer_params: int | None,
    *,
    activations: tuple = (),
    grad_accum: int = 1,
    weight_bytes: int = 2,
) -> tuple[tuple, Any, int | None, str | None]:
    """The memory table, the recommended setup, the bytes the configured setup needs per device
    (with activations estimated) and a note when they do not fit; nothing when the count is unknown."""
    if not total_params:
        return (), None, None, None
    from nexa_nb import memory

    largest = largest_layer_params or total_params
    devices = c.procs
    capacity = hw.device_memory_bytes if on_cuda else hw.host_available_bytes // max(devices, 1)
    base = memory.CUDA_CONTEXT_BYTES if on_cuda else memory.CPU_WORKER_BYTES
    rows = tuple(memory.memory_table(total_params, largest, gpus_per_node=devices, weight_bytes=weight_bytes))
    recommendation = memory.recommend(
        total_params,
        largest,
        device_bytes_available=capacity,
        host_bytes_available=hw.host_available_bytes,
        gpus_per_node=devices,
        activations=tuple(activations),
        wanted_micro_batch=c.batch_size * grad_accum,
        max_memory_usage=c.max_memory_usage,
        memory_safety_margin=c.memory_safety_margin,
        framework_base_bytes=base,
        weight_bytes=weight_bytes,
    )
    configured = memory.model_state_memory(
        total_params,
        largest,
        stage=c.zero,
        offload_optimizer=c.offload_optimizer,
        offload_param=c.offload_param,
        gpus_per_node=devices,
        weight_bytes=weight_bytes,
    )
    estimate = next((a for a in activations if a.grad_ckpt == c.grad_ckpt), None)
    if estimate is None:
        return rows, recommendation, None, None
    planned = (
        configured.device_bytes + memory.framework_bytes(configured, base, total_params) + estimate.at(c.batch_size)
    )
    budget = memory.usable_bytes(capacity, c.max_memory_usage, c.memory_safety_margin)
    note = None if planned <= budget else _does_not_fit(c, planned, estimate.at(c.batch_size), budget, recommendation)
    return rows, recommendation, planned, note


def _does_not_fit(c: TrainConfig, planned: int, activations: int, budget: int, best) -> str:
    """The note for a configured setup whose activations at its micro-batch overflow the device."""
    from nexa_nb.text import format_bytes, setup_flags

    flags = " ".join(
        part
        for part in (
            setup_flags(best.stage, best.offload_optimizer, best.offload_param),
            f"--batch-size {best.micro_batch} --grad-accum {best.grad_accum}" if best.micro_batch else "",
            "--grad-ckpt" if best.grad_ckpt else "",
        )
        if part
    )
    return (
        f"at micro-batch {c.batch_size} this setup needs {format_bytes(planned)} per device (activations "
        f"{format_bytes(activations)}), more than the {format_bytes(budget)} the plan may use "
        f"(--max-memory-usage {c.max_memory_usage} less --memory-safety-margin {c.memory_safety_margin}); "
        f"{flags or 'plain Accelerate'} fits (%nexa_plan shows why)"
    )


def deepspeed_config(c: TrainConfig, *, precision: str, grad_accum: int, world: int, on_cuda: bool) -> dict[str, Any]:
    """A complete DeepSpeed config: every value explicit, nothing "auto"."""

    def offload(device: str) -> dict[str, Any]:
        section: dict[str, Any] = {"device": device, "pin_memory": on_cuda}  # pinning helps only host<->GPU copies
        if device == "nvme":
            section["nvme_path"] = c.nvme_path
        return section

    zero: dict[str, Any] = {
        "stage": c.zero,
        "contiguous_gradients": True,
        "overlap_comm": on_cuda,  # overlapping needs CUDA streams; on CPU it only adds copies
        "reduce_bucket_size": 50_000_000,  # DeepSpeed's own default, written out
        "allgather_bucket_size": 50_000_000,
    }
    if c.offload_optimizer != "none":
        zero["offload_optimizer"] = offload(c.offload_optimizer)
    if c.zero == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_param_persistence_threshold": 100_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True,  # save_model writes whole weights
            }
        )
        if c.offload_param != "none":
            zero["offload_param"] = offload(c.offload_param)
    return {
        "train_batch_size": c.batch_size * grad_accum * world,
        "train_micro_batch_size_per_gpu": c.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": c.clip_norm or 0.0,
        "zero_optimization": zero,
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # nexa_nb reports progress itself
        "wall_clock_breakdown": False,
    }
