"""Every setting of a training run, each declared once with everything that derives from it.

A `TrainConfig` field is declared with `setting(default, help, group, ...)`. From that one
declaration come: the ``%nexa_*`` flags and their ``?`` help (`nexa_nb.flags`), the keywords
of `nexa_nb.train` (the field name, and every flag's long name and alias), the type check
(from the annotation), the field's own range or choice check, the configuration form's
control (`nexa_nb.widgets_form`), the environment variables and config-file keys that feed
it (`nexa_nb.config`), and the settings table in the README (`settings_markdown`).

Rules that involve several fields live in `nexa_nb.config.validate`. Nothing here imports
torch or looks at the hardware.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nexa_nb.schedules import SCHEDULES
from nexa_nb.slurm import KEYS as SLURM_KEYS
from nexa_nb.slurm import spec_problem as slurm_spec_problem
from nexa_nb.trackers import TRACKERS

PRECISIONS = ("no", "fp16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
SCHEDULERS = tuple(SCHEDULES)
LR_SCALING = ("none", "linear", "sqrt")
TRACKER_NAMES = tuple(TRACKERS)
ZERO_STAGES = (0, 1, 2, 3)

# Flag groups, in the order ``%nexa_train?`` lists them; the form shows one column per group.
GROUPS = (
    "DeepSpeed ZeRO and offload",
    "precision",
    "batch and processes",
    "length",
    "optimizer",
    "LoRA",
    "memory",
    "checkpoints and logging",
)


class ConfigError(ValueError):
    """A bad value or an impossible combination: names the field and how to fix it."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field_name}: {problem}. Fix: {fix}.")


# --- checks of one value --------------------------------------------------------------------

Check = Callable[[Any], "str | None"]
"""A rule on one field's value: the problem in words, or None when the value is fine."""


@dataclass(frozen=True)
class AtLeast:
    """A lower bound; its fix names the flag: "pass --procs 1 or more"."""

    low: int
    words: str = "must be at least {low}"

    def __call__(self, value) -> str | None:
        return None if value >= self.low else f"{self.words.format(low=self.low)}, got {value}"


at_least_one = AtLeast(1)
non_negative = AtLeast(0, "must be >= {low}")


def positive(value) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def probability(value) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def share(value) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


# --- the metadata of one setting --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What a `TrainConfig` field declares besides its name, type and default."""

    help: str
    group: str
    flag: str | None = ""
    """The long flag; "" derives it from the field name (``grad_accum`` -> ``--grad-accum``);
    None: no such flag (the `shortcuts` only, or none at all, and `no_flag` says why)."""
    no_flag: str = ""
    aliases: tuple[str, ...] = ()
    """More long flags meaning the same (``--offload-optimizer`` for ``--offload``)."""
    shortcuts: tuple[tuple[str, Any], ...] = ()
    """Flags that set one value (``("--fp16", "fp16")``); exclusive with the flag and each other."""
    choices: tuple | None = None
    invalid: str = "{value!r} is not one of the choices"
    """The problem of a value outside `choices`: "{value!r} is not a precision"."""
    check: Check | None = None
    fix: str = ""
    """The fix for a value refused by `choices` or `check` ("" derives one from the flag)."""
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    """Reads the flag's text, when the annotation's type cannot (``--zero none``)."""
    env: tuple[str, ...] = ()
    """Environment variables that feed the field, in the source guides' names."""
    env_parse: Callable[[str], Any] | None = None
    accelerate_keys: tuple[str, ...] = ()
    """Dotted keys in an accelerate config YAML (``deepspeed_config.zero_stage``)."""
    deepspeed_key: str | None = None
    """Dotted key in a DeepSpeed JSON (``zero_optimization.stage``)."""
    label: str | None = None
    """The form control's label; None keeps the field out of the form, and `no_form` says why."""
    no_form: str = ""
    placeholder: str = ""
    auto: str = ""
    """What the value "auto" means, for a field that also takes it (``--batch-size auto``); "" when it does not."""


def setting(default: Any, help: str, group: str, **metadata: Any):
    """A dataclass field carrying its `Setting`."""
    assert group in GROUPS, group
    return field(default=default, metadata={"setting": Setting(help=help, group=group, **metadata)})


def _zero_stage(text: str) -> int | None:
    """--zero 0..3, or none: no DeepSpeed (to override a default set by %nexa_config)."""
    if text.lower() == "none":
        return None
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeRO stage; use 0, 1, 2, 3 or none")
    return int(text)


def _clip_norm(text: str) -> float | None:
    """--clip-norm F, or none: no clipping."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a positive number or none") from None


def _batch_size(text: str) -> int | str:
    """--batch-size N, or auto: the largest micro-batch that fits (`nexa_nb.engine.auto_batch`)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use a number such as 8, or auto") from None


_BYTE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _byte_size(text: str) -> int:
    """--memory-budget 8GiB (or 8G, 512MiB, a number of bytes): binary units, as the plan prints them."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or a size such as 8GiB or 512MiB")
    return int(float(found.group(1)) * _BYTE_UNITS[found.group(2)])


def _offload_from_env(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("", "false", "0", "no"):
        return "none"
    if value in ("true", "1", "yes"):
        return "cpu"
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run can be asked to do. Each field's meaning sits beside it."""

    # --- precision ---------------------------------------------------------------------------
    precision: str = setting(
        "no",
        "mixed precision: no (fp32), fp16 or bf16; fp16 without a CUDA GPU falls back to bf16 with a note",
        "precision",
        flag=None,
        shortcuts=(("--fp16", "fp16"), ("--bf16", "bf16"), ("--fp32", "no")),
        choices=PRECISIONS,
        invalid="{value!r} is not a precision",
        fix="use one of no, fp16, bf16 (--fp32, --fp16, --bf16)",
        env=("ACCELERATE_MIXED_PRECISION",),
        accelerate_keys=("mixed_precision",),
        label="precision",
    )
    strict: bool = setting(
        False,
        "make every fallback (fp16 on a CPU, ...) an error instead of a note",
        "precision",
        label="strict (no fallbacks)",
    )

    # --- batch arithmetic ----------------------------------------------------------------------
    batch_size: int = setting(  # or "auto"
        8,
        "micro-batch per process, per forward pass; auto: the largest that fits, found by trying sizes before "
        "training (one training step each, in the run's own set-up), keeping --target-batch",
        "batch and processes",
        metavar="N|auto",
        check=at_least_one,
        parse=_batch_size,
        auto="the largest micro-batch that fits, tried before training",
        deepspeed_key="train_micro_batch_size_per_gpu",
        label="micro-batch",
        placeholder="a number, or auto",
    )
    grad_accum: int = setting(
        1,
        "micro-batches accumulated before each optimizer step",
        "batch and processes",
        metavar="N",
        check=at_least_one,
        env=("GRADIENT_ACCUMULATION_STEPS",),
        accelerate_keys=("gradient_accumulation_steps", "deepspeed_config.gradient_accumulation_steps"),
        deepspeed_key="gradient_accumulation_steps",
        label="grad accumulation",
    )
    target_batch: int | None = setting(
        None,
        "effective batch wanted; the accumulation is derived as target / (batch size x processes)",
        "batch and processes",
        metavar="N",
        deepspeed_key="train_batch_size",
        label="target batch",
        placeholder="none",
    )
    lr_scaling: str = setting(
        "none",
        "scale --lr with the effective batch: none, linear or sqrt of effective / --lr-reference-batch",
        "optimizer",
        choices=LR_SCALING,
        invalid="{value!r} is not a scaling rule",
        label="lr scaling",
    )
    lr_reference_batch: int | None = setting(
        None,
        "the batch --lr was tuned for (default: the micro-batch); used when --lr-scaling is not none",
        "optimizer",
        metavar="N",
        check=at_least_one,
        fix="pass the batch size your lr was tuned for",
        label="lr tuned for batch",
        placeholder="the micro-batch",
    )
    procs: int = setting(
        1,
        "worker processes on this machine: GPUs on a GPU host, CPU processes otherwise",
        "batch and processes",
        metavar="N",
        check=at_least_one,
        accelerate_keys=("num_processes",),
        label="processes",
    )
    num_machines: int = setting(
        1,
        "machines in the run of an exported script (world size = processes x machines)",
        "batch and processes",
        metavar="N",
        check=at_least_one,
        label=None,
        no_form="a notebook run trains on this machine; several machines run an exported script",
    )

    # --- DeepSpeed / FSDP ----------------------------------------------------------------------
    zero: int | None = setting(
        None,
        "DeepSpeed ZeRO stage 0-3; none (the default) trains without DeepSpeed: plain Accelerate, DDP for "
        "several processes",
        "DeepSpeed ZeRO and offload",
        choices=ZERO_STAGES,
        invalid="ZeRO stage must be 0, 1, 2 or 3, got {value}",
        parse=_zero_stage,
        metavar="{0,1,2,3,none}",
        fix="pass --zero 0, 1, 2 or 3",
        env=("DEEPSPEED_ZERO_STAGE",),
        accelerate_keys=("deepspeed_config.zero_stage",),
        deepspeed_key="zero_optimization.stage",
        label="ZeRO stage",
    )
    offload_optimizer: str = setting(
        "none",
        "where DeepSpeed keeps the optimizer state (ZeRO 1-3): none, cpu or nvme. It moves the optimizer "
        "only: --zero 3 --offload cpu keeps the parameters on the device; add --offload-param cpu to "
        "move them too",
        "DeepSpeed ZeRO and offload",
        flag="--offload",
        aliases=("--offload-optimizer",),
        choices=OFFLOAD_DEVICES,
        invalid="{value!r} is not an offload device",
        fix="use none, cpu or nvme",
        env=("DEEPSPEED_OFFLOAD_OPTIMIZER",),
        env_parse=_offload_from_env,
        accelerate_keys=("deepspeed_config.offload_optimizer_device",),
        deepspeed_key="zero_optimization.offload_optimizer.device",
        label="optimizer offload",
    )
    offload_param: str = setting(
        "none",
        "where DeepSpeed keeps the parameters (ZeRO-3 only): none, cpu or nvme",
        "DeepSpeed ZeRO and offload",
        choices=OFFLOAD_DEVICES,
        invalid="{value!r} is not an offload device",
        fix="use none, cpu or nvme",
        env=("DEEPSPEED_OFFLOAD_PARAM",),
        env_parse=_offload_from_env,
        accelerate_keys=("deepspeed_config.offload_param_device",),
        deepspeed_key="zero_optimization.offload_param.device",
        label="parameter offload",
    )
    nvme_path: str | None = setting(
        None,
        "existing, writable folder for nvme offload",
        "DeepSpeed ZeRO and offload",
        metavar="DIR",
        label="NVMe folder",
        placeholder="for nvme offload",
    )
    fsdp: bool = setting(
        False,
        "shard the model with PyTorch FSDP instead of ZeRO (CUDA GPUs only)",
        "DeepSpeed ZeRO and offload",
        label="FSDP",
    )
    find_unused_parameters: bool = setting(
        False,
        "DDP: allow parameters that take no part in the loss, at the cost of a search through the autograd "
        "graph at every step",
        "batch and processes",
        label="find unused parameters",
    )

    # --- model ---------------------------------------------------------------------------------
    grad_ckpt: bool = setting(
        False,
        "gradient checkpointing: recompute activations in backward to save memory",
        "memory",
        env=("ACCELERATE_GRADIENT_CHECKPOINTING",),
        accelerate_keys=("gradient_checkpointing",),
        label="gradient checkpointing",
    )
    max_memory_usage: float = setting(
        0.9,
        "share of each device's memory the memory plan may use for model states, activations and the "
        "framework (with no GPU: of each process's share of the host memory)",
        "memory",
        metavar="F",
        check=share,
        fix="pass a share such as 0.9",
        label="max memory usage",
    )
    memory_safety_margin: float = setting(
        0.1,
        "share of each device's memory the memory plan keeps free on top, for what no estimate sees "
        "(longer inputs than the first batch's); the plan uses max_memory_usage - memory_safety_margin",
        "memory",
        metavar="F",
        check=probability,
        fix="pass a share such as 0.1, below --max-memory-usage",
        label="memory safety margin",
    )
    memory_budget: int | None = setting(
        None,
        "bytes each process may use on a CPU (8GiB, 512MiB or a number), for --batch-size auto; default: "
        "its share of the available host memory, by --max-memory-usage and --memory-safety-margin",
        "memory",
        metavar="BYTES",
        parse=_byte_size,
        check=at_least_one,
        fix="pass a size such as 8GiB",
        label="memory budget (CPU)",
        placeholder="share of host memory",
    )
    lora: bool = setting(False, "train LoRA adapters (peft) instead of the whole model", "LoRA", label="LoRA")
    lora_r: int = setting(
        8,
        "LoRA rank",
        "LoRA",
        metavar="N",
        check=at_least_one,
        fix="pass --lora-r 1 or more (8 is common)",
        label="LoRA r",
    )
    lora_alpha: int = setting(
        16,
        "LoRA scale numerator (scale = alpha / r)",
        "LoRA",
        metavar="N",
        check=at_least_one,
        fix="pass --lora-alpha 1 or more (2 x r is common)",
        label="LoRA alpha",
    )
    lora_dropout: float = setting(
        0.0,
        "dropout on the LoRA branch",
        "LoRA",
        metavar="F",
        check=probability,
        fix="pass a dropout such as 0.05",
        label="LoRA dropout",
    )
    lora_target_modules: tuple[str, ...] | None = setting(
        None,
        "module names to adapt, comma-separated; none lets peft choose for known architectures, else every nn.Linear",
        "LoRA",
        metavar="NAMES",
        label="LoRA target modules",
        placeholder="peft's choice",
    )

    # --- optimisation --------------------------------------------------------------------------
    lr: float = setting(
        1e-3,
        "peak learning rate of AdamW (torch's own AdamW default)",
        "optimizer",
        metavar="F",
        check=positive,
        fix="pass a learning rate such as --lr 1e-4",
        deepspeed_key="optimizer.params.lr",
        label="learning rate",
    )
    weight_decay: float = setting(
        0.0,
        "AdamW weight decay",
        "optimizer",
        metavar="F",
        check=non_negative,
        fix="pass 0 or a small positive value",
        deepspeed_key="optimizer.params.weight_decay",
        label="weight decay",
    )
    clip_norm: float | None = setting(
        1.0,
        "clip the global gradient norm to this value; none turns clipping off",
        "optimizer",
        metavar="F|none",
        parse=_clip_norm,
        check=positive,
        fix="pass a positive norm such as 1.0, or None to disable clipping",
        accelerate_keys=("deepspeed_config.gradient_clipping",),
        deepspeed_key="gradient_clipping",
        label="clip norm",
        placeholder="none: no clipping",
    )
    warmup_steps: int = setting(
        0,
        "linear warm-up from 0 to --lr over this many optimizer steps",
        "optimizer",
        metavar="N",
        check=non_negative,
        fix="pass 0 or more",
        deepspeed_key="scheduler.params.warmup_num_steps",
        label="warm-up steps",
    )
    scheduler: str = setting(
        "constant",
        "learning rate after warm-up: " + ", ".join(SCHEDULERS) + " (to 0)",
        "optimizer",
        choices=SCHEDULERS,
        invalid="{value!r} is not a schedule",
        label="scheduler",
    )
    epochs: int = setting(
        1,
        "passes over the training data (ignored when --max-steps is given)",
        "length",
        metavar="N",
        check=at_least_one,
        label="epochs",
    )
    max_steps: int | None = setting(
        None,
        "stop after this many optimizer steps, cycling the data if needed",
        "length",
        metavar="N",
        check=at_least_one,
        fix="pass --max-steps 1 or more, or leave it out to train for --epochs",
        label="max steps",
        placeholder="none: train the epochs",
    )
    seed: int = setting(
        42,
        "seed for the weights, the data order and dropout, the same on every rank",
        "optimizer",
        metavar="N",
        check=non_negative,
        fix="pass --seed 0 or more",
        env=("SEED",),
        label="seed",
    )

    # --- checkpoints, evaluation, logging ------------------------------------------------------
    ckpt_dir: str | None = setting(
        None,
        "folder for checkpoints, one sub-folder per saved step (step-0000010)",
        "checkpoints and logging",
        metavar="PATH",
        label="checkpoint folder",
        placeholder="none: no checkpoints",
    )
    ckpt_every: int | None = setting(
        None,
        "save every N optimizer steps (and always at the end when --ckpt-dir is given)",
        "checkpoints and logging",
        metavar="N",
        check=at_least_one,
        fix="pass 1 or more",
        label="checkpoint every",
        placeholder="none: at the end only",
    )
    resume: str | None = setting(
        None,
        "continue from a checkpoint folder, or latest: the newest complete one in --ckpt-dir",
        "checkpoints and logging",
        metavar="PATH|latest",
        label="resume from",
        placeholder="none",
    )
    eval_every: int | None = setting(
        None,
        "evaluate the task's eval data every N optimizer steps (and at the end)",
        "checkpoints and logging",
        metavar="N",
        check=at_least_one,
        fix="pass 1 or more",
        label="evaluate every",
        placeholder="none: at the end only",
    )
    trackers: tuple[str, ...] = setting(
        (),
        "experiment trackers to log to, offline, comma-separated: " + ", ".join(TRACKER_NAMES),
        "checkpoints and logging",
        choices=TRACKER_NAMES,
        invalid="{value!r} is not a supported tracker",
        metavar="NAMES",
        fix="use " + " or ".join(TRACKER_NAMES),
        label="trackers",
        placeholder="none",
    )
    log_dir: str | None = setting(
        None,
        "where trackers write (default: --ckpt-dir, else ./nexa_runs)",
        "checkpoints and logging",
        metavar="PATH",
        label="tracker folder",
        placeholder="the checkpoint folder, else nexa_runs",
    )
    log_level: str | None = setting(
        None,
        "level of the libraries' loggers in the workers (accelerate, DeepSpeed, transformers): debug, info, "
        "warning, error or critical; default: their own, with warnings from rank 0 only",
        "checkpoints and logging",
        choices=LOG_LEVELS,
        invalid="{value!r} is not a log level",
        fix="use one of " + ", ".join(LOG_LEVELS),
        env=("ACCELERATE_LOG_LEVEL",),
        label="library log level",
        placeholder="the libraries' own",
    )
    output_dir: str | None = setting(
        None,
        "folder the workers write the trained model into when the run completes (safetensors; a "
        "transformers model as save_pretrained does, LoRA as a peft adapter); default: --ckpt-dir/final, "
        "else nexa_runs/TASK-YYYYmmdd-HHMMSS/model (UTC)",
        "checkpoints and logging",
        metavar="PATH",
        label="model folder",
        placeholder="ckpt folder/final, else nexa_runs",
    )
    merge_lora: bool = setting(
        False,
        "with --lora, also write the base model with the adapters merged in, into OUTPUT_DIR/merged",
        "checkpoints and logging",
        label="merge LoRA on save",
    )
    run_dir: str | None = setting(
        None,
        "folder of the run's record (plan, events, result, workers' logs), read by %nexa_runs and "
        "%nexa_attach; default: a new nexa_runs/TASK-YYYYmmdd-HHMMSS (UTC)",
        "checkpoints and logging",
        metavar="PATH",
        label="run record folder",
        placeholder="nexa_runs/TASK-time",
    )
    detach: bool = setting(
        False,
        "run in a process of its own, outside the kernel: the cell returns at once with a handle, and a kernel "
        "restart or shutdown does not stop the run (%nexa_attach follows it, %nexa_stop stops it)",
        "checkpoints and logging",
        label=None,
        no_form="the form's Train button follows its run in the cell; detach with %nexa_train --detach",
    )
    slurm: str | None = setting(
        None,
        "submit the run as a Slurm job of one node, which trains as a detached run does and writes its record on "
        "the shared filesystem: KEY=VALUE pairs, comma-separated, of " + ", ".join(SLURM_KEYS),
        "checkpoints and logging",
        metavar="SPEC",
        check=slurm_spec_problem,
        fix="write KEY=VALUE pairs such as --slurm partition=debug,cpus_per_task=2,time=30",
        label=None,
        no_form="a job is submitted from a cell: %nexa_train --slurm SPEC",
    )
    force_cpu: bool = setting(
        False,
        "train on the CPU even when GPUs are present",
        "batch and processes",
        env=("FORCE_CPU",),
        label="force CPU",
    )

    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Which layer set each non-default field: "argument", "session", "env:NAME", a file path."""

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_NAMES}


# --- what the declarations give --------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """A setting with its name, default and the type its annotation says."""

    name: str
    default: Any
    kind: type
    """bool, int, float, str or tuple (a tuple of names)."""
    optional: bool
    """None is a value of its own (``--zero none``: no DeepSpeed)."""
    meta: Setting

    @property
    def flag(self) -> str | None:
        if self.meta.flag is None:
            return None
        return self.meta.flag or "--" + self.name.replace("_", "-")

    @property
    def keywords(self) -> tuple[str, ...]:
        """The keywords of `nexa_nb.train` that set this field: its name and every flag's long name."""
        flags = ([self.flag] if self.flag else []) + list(self.meta.aliases)
        names = [self.name] + [flag.removeprefix("--").replace("-", "_") for flag in flags]
        return tuple(dict.fromkeys(names))

    @property
    def shortcut_keywords(self) -> dict[str, Any]:
        """``fp16=True`` sets precision="fp16", as ``--fp16`` does."""
        return {flag.removeprefix("--").replace("-", "_"): value for flag, value in self.meta.shortcuts}

    def problem(self, value) -> str | None:
        """What is wrong with `value` for this field alone, or None."""
        if value is None or (self.meta.auto and value == "auto"):
            return None
        values = value if self.kind is tuple else (value,)
        for item in values:
            if self.meta.choices is not None and item not in self.meta.choices:
                return self.meta.invalid.format(value=item)
        return self.meta.check(value) if self.meta.check else None

    def fix(self) -> str:
        if self.meta.fix:
            return self.meta.fix
        if self.meta.choices is not None:
            return "use one of " + ", ".join(str(choice) for choice in self.meta.choices)
        if isinstance(self.meta.check, AtLeast):
            return f"pass {self.flag} {self.meta.check.low} or more"
        return f"give {self.flag} another value"


def _describe(f) -> Field:
    hint = _HINTS[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    kind = tuple if typing.get_origin(base) is tuple else base
    return Field(f.name, f.default, kind, optional, f.metadata["setting"])


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS: dict[str, Field] = {f.name: _describe(f) for f in fields(TrainConfig) if "setting" in f.metadata}
FIELD_NAMES = tuple(FIELDS)

KEYWORDS: dict[str, str] = {keyword: f.name for f in FIELDS.values() for keyword in f.keywords}
"""Every keyword of `nexa_nb.train` that sets a field -> that field."""
SHORTCUTS: dict[str, tuple[str, Any]] = {
    keyword: (f.name, value) for f in FIELDS.values() for keyword, value in f.shortcut_keywords.items()
}


def by_group() -> dict[str, list[Field]]:
    """The fields of each group, groups in `GROUPS` order, fields in declaration order."""
    return {group: [f for f in FIELDS.values() if f.meta.group == group] for group in GROUPS}


# --- keywords and types ------------------------------------------------------------------------


def canonical(options: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`options` keyed by field names: ``offload="cpu"`` -> offload_optimizer, ``bf16=True`` -> precision.

    Two keywords for the same field are refused, and so is a name that sets none.
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    where = "" if source == "argument" else f" (from {source})"
    for keyword, value in options.items():
        if keyword in KEYWORDS:
            name = KEYWORDS[keyword]
        elif keyword in SHORTCUTS:
            name, const = SHORTCUTS[keyword]
            if value is not True:
                raise ConfigError(
                    keyword, f"{keyword}= takes True, got {value!r}{where}", f"pass {keyword}=True or {name}={const!r}"
                )
            value = const
        else:
            raise ConfigError(keyword, f"is not a nexa_nb option{where}", "use one of: " + ", ".join(FIELD_NAMES))
        if name in given:
            raise ConfigError(name, f"given twice, as {given[name]}= and {keyword}={where}", "keep only one of them")
        given[name] = keyword
        out[name] = value
    return out


def coerce(name: str, value: Any, source: str) -> Any:
    """`value` as the type field `name` declares, or a ConfigError naming its source."""
    f = FIELDS[name]
    where = "" if source == "argument" else f" (from {source})"

    def bad(expected: str) -> ConfigError:
        return ConfigError(name, f"expected {expected}, got {value!r}{where}", f"give {name} {expected}")

    if value is None and (f.optional or f.kind is tuple):
        return None if f.optional else ()
    if f.meta.auto and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and f.meta.parse is _byte_size:  # memory_budget="8GiB"
        try:
            return f.meta.parse(value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(name, f"{exc}{where}", f.fix()) from None
    if f.kind is tuple:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise bad("a list of names")
        return tuple(value)
    if f.kind is bool:
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if f.kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad('a whole number or "auto"' if f.meta.auto else "a whole number")
        return value
    if f.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if f.meta.choices is not None:
        if not isinstance(value, str):
            raise bad("a string")
        return value.lower()
    if not isinstance(value, (str, os.PathLike)):
        raise bad("a path")
    return os.fspath(value)


def check_fields(config: TrainConfig) -> None:
    """Each field's own rule; the first problem is raised, naming the layer that set the value."""
    for f in FIELDS.values():
        value = getattr(config, f.name)
        problem = f.problem(value)
        if problem is not None:
            source = config.source_of(f.name)
            where = "" if source in ("argument", "default") else f" (from {source})"
            raise ConfigError(f.name, problem + where, f.fix())


# --- the README's settings table ----------------------------------------------------------------


def settings_markdown() -> str:
    """The settings table of the README: generated from the declarations (a test keeps it fresh)."""
    rows = ["| setting | flags (and `train` keywords) | default | read from | what it does |", "|---|---|---|---|---|"]
    for group, group_fields in by_group().items():
        rows.append(f"| **{group}** | | | | |")
        for f in group_fields:
            flags = [*([f.flag] if f.flag else []), *f.meta.aliases, *(flag for flag, _ in f.meta.shortcuts)]
            flag_text = ", ".join(f"`{flag}`" for flag in flags) or f"none: {f.meta.no_flag}"
            sources = [f"`${name}`" for name in f.meta.env]
            sources += [f"YAML `{key}`" for key in f.meta.accelerate_keys]
            sources += [f"JSON `{f.meta.deepspeed_key}`"] if f.meta.deepspeed_key else []
            default = "none" if f.default is None else ("()" if f.default == () else f.default)
            rows.append(f"| `{f.name}` | {flag_text} | `{default}` | {', '.join(sources)} | {f.meta.help} |")
    return "\n".join(rows) + "\n"


README_TABLE_MARKERS = ("<!-- settings table: start -->", "<!-- settings table: end -->")


def write_readme_table(readme: str) -> None:
    """Put `settings_markdown` between the README's markers."""
    start, end = README_TABLE_MARKERS
    with open(readme) as f:
        text = f.read()
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    with open(readme, "w") as f:
        f.write(f"{before}{start}\n{settings_markdown()}{end}{after}")
