"""What the user may ask for, and where each value came from.

Layers, later wins:

    defaults < accelerate config YAML < DeepSpeed JSON < environment variables
             < session defaults (``%nexa_config``) < explicit arguments

`resolve_config` returns a `TrainConfig` whose `sources` maps every field that is not a
default to the layer that set it, so ``%nexa_config`` can say why a value is what it is.
Nothing here imports torch or looks at the hardware.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

PRECISIONS = ("no", "fp16", "bf16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
SCHEDULERS = ("constant", "linear", "cosine")
LR_SCALING = ("none", "linear", "sqrt")
TRACKERS = ("tensorboard", "mlflow")


class ConfigError(ValueError):
    """A bad value or an impossible combination: names the field and how to fix it."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field_name}: {problem}. Fix: {fix}.")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run can be asked to do. Each field's meaning sits beside it."""

    # --- precision -------------------------------------------------------------------
    precision: str = "no"
    """Mixed precision: "no" (fp32), "fp16" or "bf16". fp16 without a CUDA GPU falls back (see strict)."""
    strict: bool = False
    """Turn every fallback (fp16 on CPU, ...) into an error instead of a note."""

    # --- batch arithmetic -------------------------------------------------------------
    batch_size: int = 8
    """Micro-batch per process, per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated before each optimizer step."""
    target_batch: int | None = None
    """Effective batch wanted; grad_accum is derived as target / (batch_size x procs)."""
    lr_scaling: str = "none"
    """How lr follows the effective batch: "none", "linear" or "sqrt" of effective/lr_reference_batch."""
    lr_reference_batch: int | None = None
    """The batch `lr` was tuned for (default: batch_size); only used when lr_scaling != "none"."""
    procs: int = 1
    """Worker processes on this machine (GPUs on a GPU host, CPU processes otherwise)."""
    num_machines: int = 1
    """Machines in the run (exported scripts under ``accelerate launch``); world size = procs x num_machines."""

    # --- DeepSpeed / FSDP ---------------------------------------------------------------
    zero: int | None = None
    """DeepSpeed ZeRO stage 0-3; None trains without DeepSpeed (plain Accelerate / DDP)."""
    offload_optimizer: str = "none"
    """Where DeepSpeed keeps optimizer state: "none", "cpu" or "nvme" (ZeRO 1-3)."""
    offload_param: str = "none"
    """Where DeepSpeed keeps parameters: "none", "cpu" or "nvme" (ZeRO 3 only)."""
    nvme_path: str | None = None
    """Directory for NVMe offload (must exist and be writable)."""
    fsdp: bool = False
    """PyTorch FSDP full sharding (CUDA GPUs only; not together with ZeRO)."""
    find_unused_parameters: bool = False
    """DDP (several processes without ZeRO): allow parameters that take no part in the loss,
    at the cost of a search through the autograd graph at every step."""

    # --- model -------------------------------------------------------------------------
    grad_ckpt: bool = False
    """Gradient (activation) checkpointing: recompute activations in backward to save memory."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of the full model."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module names to adapt; None lets peft pick for known architectures, else every nn.Linear."""

    # --- optimisation ------------------------------------------------------------------
    lr: float = 1e-3
    """Peak learning rate of AdamW (torch's own AdamW default)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    scheduler: str = "constant"
    """Learning-rate schedule after warm-up: "constant", "linear" (to 0) or "cosine" (to 0)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, cycling the data if needed."""
    seed: int = 42
    """Seed for model init, data order and dropout, identical on every rank."""

    # --- checkpoints, evaluation, logging ---------------------------------------------
    ckpt_dir: str | None = None
    """Where checkpoints go (one sub-folder per saved step)."""
    ckpt_every: int | None = None
    """Save every N optimizer steps (and always at the end when ckpt_dir is set)."""
    resume: str | None = None
    """A checkpoint folder to continue from, or "latest" to take the newest in ckpt_dir."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps (and at the end) when the task has eval data."""
    trackers: tuple[str, ...] = ()
    """Accelerate trackers to log to, offline: "tensorboard", "mlflow"."""
    log_dir: str | None = None
    """Where trackers write (default: ckpt_dir, else ./nexa_runs)."""
    force_cpu: bool = False
    """Train on the CPU even when GPUs are present."""

    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Which layer set each non-default field: "argument", "session", "env:NAME", a file path."""

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig) if f.name != "sources")
_TUPLE_FIELDS = {"lora_target_modules", "trackers"}


# --- layer readers ----------------------------------------------------------------------

# Keys that `accelerate config` writes and that do not change what a notebook run does.
_ACCELERATE_IGNORED_KEYS = {
    "compute_environment", "debug", "downcast_bf16", "enable_cpu_affinity", "machine_rank",
    "main_training_function", "num_machines", "rdzv_backend", "same_network", "tpu_env",
    "tpu_use_cluster", "tpu_use_sudo", "main_process_ip", "main_process_port", "gpu_ids",
    "dynamo_config", "ipex_config", "mpirun_config", "megatron_lm_config", "tpu_name",
    "tpu_zone", "tpu_vm", "commands", "command_file", "parallelism_config", "fp8_config",
}
_ACCELERATE_KEYS = _ACCELERATE_IGNORED_KEYS | {
    "distributed_type", "mixed_precision", "num_processes", "use_cpu", "deepspeed_config",
    "fsdp_config", "gradient_accumulation_steps", "gradient_checkpointing",
}
_DEEPSPEED_TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "zero_optimization", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "activation_checkpointing", "flops_profiler",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "zero_allow_untested_optimizer",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "amp", "aio", "data_efficiency", "compression_training", "checkpoint",
    "elasticity", "autotuning", "dump_state", "zero_force_ds_cpu_optimizer",
    "memory_breakdown", "torch_autocast", "data_types", "seq_parallel_communication_data_type",
}


def _read_text(path: str | os.PathLike, what: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("config", f"{what} file {str(path)!r} does not exist",
                          "check the path (it is relative to the notebook's working directory)")
    if p.is_dir():
        raise ConfigError("config", f"{str(path)!r} is a folder, not a {what} file",
                          "pass the file itself")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {what} file {str(path)!r} ({exc})",
                          "make the file readable, or pass another one") from None


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def read_deepspeed_json(path: str | os.PathLike) -> dict[str, Any]:
    """Map a DeepSpeed JSON onto config fields; "auto" values are left to the plan."""
    text = _read_text(path, "DeepSpeed JSON")
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("config", f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})",
                          "fix the JSON syntax (DeepSpeed configs allow no comments)") from None
    if not isinstance(ds, dict):
        raise ConfigError("config", f"{str(path)!r} holds a {type(ds).__name__}, not a JSON object",
                          "a DeepSpeed config is a JSON object such as {\"zero_optimization\": {\"stage\": 2}}")
    unknown = sorted(set(ds) - _DEEPSPEED_TOP_KEYS)
    if unknown:
        raise ConfigError("config", f"{str(path)!r} has unknown DeepSpeed key(s) {', '.join(unknown)}",
                          "remove or correct them (see the DeepSpeed config reference)")
    out: dict[str, Any] = {}

    def take(name, value, kind):
        if value is None or _is_auto(value):
            return
        if kind is bool and not isinstance(value, bool):
            raise ConfigError("config", f"{str(path)!r}: {name} must be true or false, got {value!r}",
                              f"set {name} to true or false")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError("config", f"{str(path)!r}: {name} must be a number, got {value!r}",
                              f"set {name} to a number or \"auto\"")
        return kind(value)

    mb = take("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"), int)
    if mb is not None:
        out["batch_size"] = mb
    ga = take("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), int)
    if ga is not None:
        out["grad_accum"] = ga
    tb = take("train_batch_size", ds.get("train_batch_size"), int)
    if tb is not None:
        out["target_batch"] = tb
    clip = take("gradient_clipping", ds.get("gradient_clipping"), float)
    if clip is not None:
        out["clip_norm"] = clip or None
    for prec in ("fp16", "bf16"):
        section = ds.get(prec, {})
        if not isinstance(section, dict):
            raise ConfigError("config", f"{str(path)!r}: {prec} must be an object", f"write \"{prec}\": {{\"enabled\": true}}")
        enabled = section.get("enabled")
        if enabled is True:
            out["precision"] = prec
    zo = ds.get("zero_optimization", {})
    if not isinstance(zo, dict):
        raise ConfigError("config", f"{str(path)!r}: zero_optimization must be an object",
                          "write \"zero_optimization\": {\"stage\": 2}")
    stage = take("zero_optimization.stage", zo.get("stage", 0), int)
    out["zero"] = 0 if stage is None else stage
    for key, target in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param")):
        section = zo.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError("config", f"{str(path)!r}: zero_optimization.{key} must be an object",
                              f"write \"{key}\": {{\"device\": \"cpu\"}}")
        out[target] = str(section.get("device", "none"))
        if section.get("nvme_path"):
            out["nvme_path"] = str(section["nvme_path"])
    opt = ds.get("optimizer", {})
    params = opt.get("params", {}) if isinstance(opt, dict) else {}
    lr = take("optimizer.params.lr", params.get("lr"), float)
    if lr is not None:
        out["lr"] = lr
    wd = take("optimizer.params.weight_decay", params.get("weight_decay"), float)
    if wd is not None:
        out["weight_decay"] = wd
    sched = ds.get("scheduler", {})
    sparams = sched.get("params", {}) if isinstance(sched, dict) else {}
    warm = take("scheduler.params.warmup_num_steps", sparams.get("warmup_num_steps"), int)
    if warm is not None:
        out["warmup_steps"] = warm
    return out


def read_accelerate_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """Map an accelerate config YAML onto config fields.

    Returns the values and the path of a DeepSpeed JSON it points to (``deepspeed_config_file``),
    which the caller reads as the next layer.
    """
    import yaml  # light, and only needed when a file is given

    text = _read_text(path, "accelerate config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})",
                          "fix the YAML syntax, or regenerate the file with `accelerate config`") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{str(path)!r} holds a {type(data).__name__}, not a mapping",
                          "an accelerate config is a YAML mapping such as `mixed_precision: bf16`")
    unknown = sorted(set(data) - _ACCELERATE_KEYS)
    if unknown:
        raise ConfigError("config", f"{str(path)!r} has unknown key(s) {', '.join(unknown)}",
                          "remove or correct them (compare with a file written by `accelerate config`)")
    out: dict[str, Any] = {}
    ds_file = None
    mixed_precision = data.get("mixed_precision")
    if mixed_precision is not None:  # null: accelerate's "not set"; an unquoted `no` reads as false
        out["precision"] = "no" if mixed_precision is False else str(mixed_precision).lower()
    if "num_processes" in data:
        out["procs"] = data["num_processes"]
    if data.get("use_cpu") is True:
        out["force_cpu"] = True
    if "gradient_accumulation_steps" in data:
        out["grad_accum"] = data["gradient_accumulation_steps"]
    if "gradient_checkpointing" in data:
        out["grad_ckpt"] = data["gradient_checkpointing"]
    dist = str(data.get("distributed_type", "NO")).upper()
    if dist == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if not isinstance(ds, dict):
            raise ConfigError("config", f"{str(path)!r}: deepspeed_config must be a mapping",
                              "write deepspeed_config: {zero_stage: 2}")
        ds_file = ds.get("deepspeed_config_file")
        out["zero"] = ds.get("zero_stage", 2 if ds_file is None else None)
        if out["zero"] is None:
            del out["zero"]
        for key, target in (("offload_optimizer_device", "offload_optimizer"),
                            ("offload_param_device", "offload_param"),
                            ("gradient_accumulation_steps", "grad_accum"),
                            ("gradient_clipping", "clip_norm")):
            if key in ds and not _is_auto(ds[key]):
                out[target] = ds[key]
        if out.get("clip_norm") == 0:
            out["clip_norm"] = None  # accelerate and DeepSpeed write 0 for "no clipping"
        nvme = ds.get("offload_optimizer_nvme_path") or ds.get("offload_param_nvme_path")
        if nvme and nvme != "none":
            out["nvme_path"] = nvme
    elif dist == "FSDP":
        out["fsdp"] = True
    if ds_file is not None:
        ds_file = str((Path(path).parent / ds_file) if not Path(ds_file).is_absolute() and not Path(ds_file).exists() else ds_file)
    return out, ds_file


def read_config_file(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Read an accelerate YAML or a DeepSpeed JSON into (source, values) layers, in order."""
    if Path(path).expanduser().is_dir():
        raise ConfigError("config", f"{str(path)!r} is a folder, not a config file", "pass the file itself")
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return [(str(path), read_deepspeed_json(path))]
    if suffix in (".yaml", ".yml"):
        values, ds_file = read_accelerate_yaml(path)
        layers = [(str(path), values)]
        if ds_file:
            layers.append((ds_file, read_deepspeed_json(ds_file)))
        return layers
    raise ConfigError("config", f"{str(path)!r} is neither .yaml/.yml (accelerate) nor .json (DeepSpeed)",
                      "pass an accelerate config YAML or a DeepSpeed JSON, like the files in configs/")


def _env_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"env {name}", f"{raw!r} is not a boolean", f"set {name}=true or {name}=false, or unset it")


def _env_int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"env {name}", f"{raw!r} is not an integer", f"set {name} to a whole number, or unset it") from None


def _env_offload(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value in ("", "false", "0", "no"):
        return "none"
    if value in ("true", "1", "yes"):
        return "cpu"
    return value


def read_environment(environ: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The environment variables of the source guides, one layer per variable set."""
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []

    def add(name, values):
        layers.append((f"env:{name}", values))

    if "ACCELERATE_MIXED_PRECISION" in env:
        add("ACCELERATE_MIXED_PRECISION", {"precision": env["ACCELERATE_MIXED_PRECISION"].strip().lower()})
    if "GRADIENT_ACCUMULATION_STEPS" in env:
        add("GRADIENT_ACCUMULATION_STEPS", {"grad_accum": _env_int("GRADIENT_ACCUMULATION_STEPS", env["GRADIENT_ACCUMULATION_STEPS"])})
    if "FORCE_CPU" in env:
        add("FORCE_CPU", {"force_cpu": _env_bool("FORCE_CPU", env["FORCE_CPU"])})
    if "USE_DEEPSPEED" in env:
        on = _env_bool("USE_DEEPSPEED", env["USE_DEEPSPEED"])
        stage = _env_int("DEEPSPEED_ZERO_STAGE", env["DEEPSPEED_ZERO_STAGE"]) if "DEEPSPEED_ZERO_STAGE" in env else 2
        add("USE_DEEPSPEED", {"zero": stage if on else None})
    elif "DEEPSPEED_ZERO_STAGE" in env:
        add("DEEPSPEED_ZERO_STAGE", {"zero": _env_int("DEEPSPEED_ZERO_STAGE", env["DEEPSPEED_ZERO_STAGE"])})
    if "DEEPSPEED_OFFLOAD_OPTIMIZER" in env:
        add("DEEPSPEED_OFFLOAD_OPTIMIZER", {"offload_optimizer": _env_offload("DEEPSPEED_OFFLOAD_OPTIMIZER", env["DEEPSPEED_OFFLOAD_OPTIMIZER"])})
    if "DEEPSPEED_OFFLOAD_PARAM" in env:
        add("DEEPSPEED_OFFLOAD_PARAM", {"offload_param": _env_offload("DEEPSPEED_OFFLOAD_PARAM", env["DEEPSPEED_OFFLOAD_PARAM"])})
    if "ACCELERATE_GRADIENT_CHECKPOINTING" in env:
        add("ACCELERATE_GRADIENT_CHECKPOINTING", {"grad_ckpt": _env_bool("ACCELERATE_GRADIENT_CHECKPOINTING", env["ACCELERATE_GRADIENT_CHECKPOINTING"])})
    if "SEED" in env:
        add("SEED", {"seed": _env_int("SEED", env["SEED"])})
    return layers


# --- resolution and validation ----------------------------------------------------------

def _coerce(name: str, value: Any, source: str) -> Any:
    """Check one value's type against the field's default, with a message naming its source."""
    default = getattr(TrainConfig, name, None) if name in FIELD_NAMES else None
    where = "" if source == "argument" else f" (from {source})"

    def bad(expected):
        return ConfigError(name, f"expected {expected}, got {value!r}{where}", f"give {name} {expected}")

    if name in _TUPLE_FIELDS:
        if value is None:
            return None if name == "lora_target_modules" else ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of names")
        return tuple(value)
    if name in ("strict", "fsdp", "find_unused_parameters", "grad_ckpt", "lora", "force_cpu"):
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if name in ("batch_size", "grad_accum", "procs", "num_machines", "lora_r", "lora_alpha", "warmup_steps", "epochs", "seed") or \
            name in ("target_batch", "lr_reference_batch", "zero", "max_steps", "ckpt_every", "eval_every"):
        if value is None and name in ("target_batch", "lr_reference_batch", "zero", "max_steps", "ckpt_every", "eval_every"):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("a whole number")
        return value
    if name in ("lr", "weight_decay", "lora_dropout", "clip_norm"):
        if value is None and name == "clip_norm":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if name in ("precision", "offload_optimizer", "offload_param", "scheduler", "lr_scaling"):
        if not isinstance(value, str):
            raise bad("a string")
        return value.lower()
    if name in ("nvme_path", "ckpt_dir", "resume", "log_dir"):
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise bad("a path")
        return os.fspath(value)
    del default
    return value


def resolve_config(
    *,
    config_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    session: Mapping[str, Any] | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the validated config from every layer (see the module docstring)."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers += read_config_file(config_file)
    layers += read_environment(environ)
    if session:
        layers.append(("session", session))
    if arguments:
        layers.append(("argument", arguments))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for name, value in layer.items():
            if name not in FIELD_NAMES:
                raise ConfigError(name, f"is not a nexa_nb option (from {source})",
                                  f"use one of: {', '.join(FIELD_NAMES)}")
            values[name] = _coerce(name, value, source)
            sources[name] = source
    cfg = replace(TrainConfig(), **values, sources=sources)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise `ConfigError` for the first bad value or impossible combination."""

    def src(name):
        s = cfg.source_of(name)
        return "" if s in ("argument", "default") else f" (from {s})"

    def need(cond, name, problem, fix):
        if not cond:
            raise ConfigError(name, problem + src(name), fix)

    need(cfg.precision in PRECISIONS, "precision", f"{cfg.precision!r} is not a precision",
         "use one of no, fp16, bf16 (--fp32, --fp16, --bf16)")
    need(cfg.batch_size >= 1, "batch_size", f"must be at least 1, got {cfg.batch_size}", "pass --batch-size 1 or more")
    need(cfg.grad_accum >= 1, "grad_accum", f"must be at least 1, got {cfg.grad_accum}", "pass --grad-accum 1 or more")
    need(cfg.procs >= 1, "procs", f"must be at least 1, got {cfg.procs}", "pass --procs 1 or more")
    need(cfg.num_machines >= 1, "num_machines", f"must be at least 1, got {cfg.num_machines}", "pass 1 or more")
    need(cfg.epochs >= 1, "epochs", f"must be at least 1, got {cfg.epochs}", "pass --epochs 1 or more")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", f"must be at least 1, got {cfg.max_steps}",
         "pass --max-steps 1 or more, or leave it out to train for --epochs")
    need(cfg.lr > 0, "lr", f"must be positive, got {cfg.lr}", "pass a learning rate such as --lr 1e-4")
    need(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}", "pass 0 or a small positive value")
    need(cfg.clip_norm is None or cfg.clip_norm > 0, "clip_norm", f"must be positive, got {cfg.clip_norm}",
         "pass a positive norm such as 1.0, or None to disable clipping")
    need(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}", "pass 0 or more")
    need(cfg.scheduler in SCHEDULERS, "scheduler", f"{cfg.scheduler!r} is not a schedule", f"use one of {', '.join(SCHEDULERS)}")
    need(cfg.lr_scaling in LR_SCALING, "lr_scaling", f"{cfg.lr_scaling!r} is not a scaling rule", f"use one of {', '.join(LR_SCALING)}")
    need(cfg.lr_reference_batch is None or cfg.lr_reference_batch >= 1, "lr_reference_batch",
         f"must be at least 1, got {cfg.lr_reference_batch}", "pass the batch size your lr was tuned for")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}", "pass --seed 0 or more")
    need(cfg.lora_r >= 1, "lora_r", f"must be at least 1, got {cfg.lora_r}", "pass --lora-r 1 or more (8 is common)")
    need(cfg.lora_alpha >= 1, "lora_alpha", f"must be at least 1, got {cfg.lora_alpha}", "pass --lora-alpha 1 or more (2 x r is common)")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}", "pass a dropout such as 0.05")
    for tracker in cfg.trackers:
        need(tracker in TRACKERS, "trackers", f"{tracker!r} is not a supported tracker", f"use {' or '.join(TRACKERS)}")

    # DeepSpeed and FSDP
    need(cfg.zero is None or cfg.zero in (0, 1, 2, 3), "zero", f"ZeRO stage must be 0, 1, 2 or 3, got {cfg.zero}",
         "pass --zero 0, 1, 2 or 3")
    for name in ("offload_optimizer", "offload_param"):
        value = getattr(cfg, name)
        need(value in OFFLOAD_DEVICES, name, f"{value!r} is not an offload device", "use none, cpu or nvme")
    need(not (cfg.fsdp and cfg.zero is not None), "fsdp", "FSDP and DeepSpeed ZeRO cannot be combined",
         "choose one: drop --zero for FSDP, or drop fsdp for ZeRO")
    need(cfg.offload_optimizer == "none" or (cfg.zero or 0) >= 1, "offload_optimizer",
         f"optimizer offload needs ZeRO stage 1, 2 or 3 (stage is {cfg.zero})", "pass --zero 2 (or 3) with --offload")
    need(cfg.offload_param == "none" or cfg.zero == 3, "offload_param",
         f"parameter offload needs ZeRO stage 3 (stage is {cfg.zero})", "pass --zero 3, or drop parameter offload")
    if "nvme" in (cfg.offload_optimizer, cfg.offload_param):
        need(cfg.nvme_path is not None, "nvme_path", "NVMe offload needs a folder", "pass --nvme-path DIR (a local, writable folder)")
        need(Path(cfg.nvme_path).is_dir(), "nvme_path", f"{cfg.nvme_path!r} is not an existing folder", "create it or pass another --nvme-path")
        need(os.access(cfg.nvme_path, os.W_OK), "nvme_path", f"{cfg.nvme_path!r} is not writable", "pass a folder you can write to")

    # batch arithmetic
    if cfg.target_batch is not None:
        world = cfg.procs * cfg.num_machines
        per_step = cfg.batch_size * world
        need(cfg.target_batch >= per_step and cfg.target_batch % per_step == 0, "target_batch",
             f"{cfg.target_batch} is not a multiple of batch_size x processes = {cfg.batch_size} x {world} = {per_step}",
             f"pass --target-batch {max(per_step, cfg.target_batch // per_step * per_step)} or change --batch-size")
        derived = cfg.target_batch // per_step
        # a grad_accum from an earlier layer (say an accelerate YAML) gives way to the target batch
        earlier = cfg.source_of("grad_accum") == "default" or \
            _layer_rank(cfg.source_of("grad_accum")) < _layer_rank(cfg.source_of("target_batch"))
        need(earlier or cfg.grad_accum == derived, "grad_accum",
             f"--grad-accum {cfg.grad_accum} contradicts --target-batch {cfg.target_batch} "
             f"(which needs {derived} with batch {cfg.batch_size} x {world} processes)",
             "pass only one of --grad-accum and --target-batch")

    # checkpoints
    need(cfg.ckpt_every is None or cfg.ckpt_every >= 1, "ckpt_every", f"must be at least 1, got {cfg.ckpt_every}", "pass 1 or more")
    need(cfg.ckpt_every is None or cfg.ckpt_dir is not None, "ckpt_every", "a checkpoint interval needs a folder",
         "pass --ckpt-dir DIR as well")
    need(cfg.eval_every is None or cfg.eval_every >= 1, "eval_every", f"must be at least 1, got {cfg.eval_every}", "pass 1 or more")
    need(cfg.resume != "latest" or cfg.ckpt_dir is not None, "resume", "resume='latest' needs a checkpoint folder",
         "pass --ckpt-dir DIR, or --resume with a checkpoint path")
    if cfg.ckpt_dir is not None:
        _check_writable_dir(cfg.ckpt_dir, "ckpt_dir", "--ckpt-dir")
    if cfg.resume is not None and cfg.resume != "latest":
        need(Path(cfg.resume).is_dir(), "resume", f"checkpoint {cfg.resume!r} does not exist",
             "pass a folder written by a previous run (ckpt_dir/step-N), or 'latest'")


def _layer_rank(source: str) -> int:
    """Where a source sits in the layer order: default < file < env < session < argument."""
    if source == "default":
        return 0
    if source.startswith("env:"):
        return 2
    return {"session": 3, "argument": 4}.get(source, 1)


def _check_writable_dir(path: str, name: str, flag: str) -> None:
    """A folder that exists and is writable, or could be created: checked without writing anything."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(name, f"{path!r} is a file, not a folder", f"pass a folder to {flag}")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(name, f"{path!r} cannot be written ({probe} is not writable)", f"pass a writable folder to {flag}")
