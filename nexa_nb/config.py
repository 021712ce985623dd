"""What the user may ask for, and where each value came from.

Layers, later wins:

    defaults < accelerate config YAML < DeepSpeed JSON < environment variables
             < session defaults (``%nexa_config``) < explicit arguments

The config files are the one passed (``config=``), else those ``ACCELERATE_CONFIG_FILE`` and
``DEEPSPEED_CONFIG_FILE`` name.

`resolve_config` returns a `TrainConfig` whose `sources` maps every field that is not a
default to the layer that set it, so ``%nexa_config`` can say why a value is what it is.
The settings themselves, and the keys and variables that feed each, are declared in
`nexa_nb.settings`; this module reads the layers and checks the rules that involve
several fields. Nothing here imports torch or looks at the hardware.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from nexa_nb.settings import (
    FIELD_NAMES,
    FIELDS,
    LR_SCALING,
    OFFLOAD_DEVICES,
    PRECISIONS,
    SCHEDULERS,
    ConfigError,
    TrainConfig,
    canonical,
    check_fields,
    coerce,
)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "FIELD_NAMES",
    "PRECISIONS",
    "OFFLOAD_DEVICES",
    "SCHEDULERS",
    "LR_SCALING",
    "resolve_config",
    "validate",
    "read_config_file",
    "read_environment",
    "read_config_file_variables",
]


# --- layer readers ----------------------------------------------------------------------

# Keys that `accelerate config` writes and that do not change what a notebook run does.
_ACCELERATE_IGNORED_KEYS = {
    "compute_environment",
    "debug",
    "downcast_bf16",
    "enable_cpu_affinity",
    "machine_rank",
    "main_training_function",
    "num_machines",
    "rdzv_backend",
    "same_network",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "main_process_ip",
    "main_process_port",
    "gpu_ids",
    "dynamo_config",
    "ipex_config",
    "mpirun_config",
    "megatron_lm_config",
    "tpu_name",
    "tpu_zone",
    "tpu_vm",
    "commands",
    "command_file",
    "parallelism_config",
    "fp8_config",
}
_ACCELERATE_KEYS = _ACCELERATE_IGNORED_KEYS | {
    "distributed_type",
    "mixed_precision",
    "num_processes",
    "use_cpu",
    "deepspeed_config",
    "fsdp_config",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
}
_DEEPSPEED_TOP_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "zero_optimization",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "zero_allow_untested_optimizer",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "amp",
    "aio",
    "data_efficiency",
    "compression_training",
    "checkpoint",
    "elasticity",
    "autotuning",
    "dump_state",
    "zero_force_ds_cpu_optimizer",
    "memory_breakdown",
    "torch_autocast",
    "data_types",
    "seq_parallel_communication_data_type",
}


def _read_text(path: str | os.PathLike, what: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            "config",
            f"{what} file {str(path)!r} does not exist",
            "check the path (it is relative to the notebook's working directory)",
        )
    if p.is_dir():
        raise ConfigError("config", f"{str(path)!r} is a folder, not a {what} file", "pass the file itself")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "config", f"cannot read {what} file {str(path)!r} ({exc})", "make the file readable, or pass another one"
        ) from None


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def _lookup(data: Mapping[str, Any], dotted: str, path) -> Any:
    """The value at `dotted` ("zero_optimization.stage") in `data`, None when absent."""
    *sections, key = dotted.split(".")
    walked = []
    for section in sections:
        walked.append(section)
        data = data.get(section, {})
        if not isinstance(data, dict):
            where = ".".join(walked)
            raise ConfigError(
                "config",
                f"{str(path)!r}: {where} must be an object",
                f'write "{where}" as an object, as in the files in configs/',
            )
    return data.get(key)


def _file_value(name: str, value: Any, key: str, path) -> Any:
    """A value read from a config file, type-checked for field `name` (None: absent or "auto")."""
    if value is None or _is_auto(value):
        return None
    kind = FIELDS[name].kind
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(
            "config", f"{str(path)!r}: {key} must be true or false, got {value!r}", f"set {key} to true or false"
        )
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(
            "config", f"{str(path)!r}: {key} must be a number, got {value!r}", f'set {key} to a number or "auto"'
        )
    return kind(value)


def read_deepspeed_json(path: str | os.PathLike) -> dict[str, Any]:
    """Map a DeepSpeed JSON onto config fields (each field's ``deepspeed_key``); "auto" is left to the plan."""
    text = _read_text(path, "DeepSpeed JSON")
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "config",
            f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})",
            "fix the JSON syntax (DeepSpeed configs allow no comments)",
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(
            "config",
            f"{str(path)!r} holds a {type(ds).__name__}, not a JSON object",
            'a DeepSpeed config is a JSON object such as {"zero_optimization": {"stage": 2}}',
        )
    unknown = sorted(set(ds) - _DEEPSPEED_TOP_KEYS)
    if unknown:
        raise ConfigError(
            "config",
            f"{str(path)!r} has unknown DeepSpeed key(s) {', '.join(unknown)}",
            "remove or correct them (see the DeepSpeed config reference)",
        )
    out: dict[str, Any] = {}
    for f in FIELDS.values():
        key = f.meta.deepspeed_key
        if key is not None:
            value = _file_value(f.name, _lookup(ds, key, path), key, path)
            if value is not None:
                out[f.name] = value
    # What a key alone cannot say: a DeepSpeed file means DeepSpeed (stage 0 unless given),
    # clipping 0 means none, the precision is the enabled section, nvme_path sits in either section.
    out.setdefault("zero", 0)
    if "clip_norm" in out:
        out["clip_norm"] = out["clip_norm"] or None
    for precision in ("fp16", "bf16"):
        if _lookup(ds, f"{precision}.enabled", path) is True:
            out["precision"] = precision
    for section in ("offload_optimizer", "offload_param"):
        nvme = _lookup(ds, f"zero_optimization.{section}.nvme_path", path)
        if nvme:
            out["nvme_path"] = str(nvme)
    return out


def read_accelerate_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """Map an accelerate config YAML onto config fields (each field's ``accelerate_keys``).

    Returns the values and the path of a DeepSpeed JSON it points to (``deepspeed_config_file``),
    which the caller reads as the next layer. Values are checked as the field's type later,
    with this file named as their source.
    """
    import yaml  # light, and only needed when a file is given

    text = _read_text(path, "accelerate config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            "config",
            f"{str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})",
            "fix the YAML syntax, or regenerate the file with `accelerate config`",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            "config",
            f"{str(path)!r} holds a {type(data).__name__}, not a mapping",
            "an accelerate config is a YAML mapping such as `mixed_precision: bf16`",
        )
    unknown = sorted(set(data) - _ACCELERATE_KEYS)
    if unknown:
        raise ConfigError(
            "config",
            f"{str(path)!r} has unknown key(s) {', '.join(unknown)}",
            "remove or correct them (compare with a file written by `accelerate config`)",
        )
    dist = str(data.get("distributed_type", "NO")).upper()
    if dist == "DEEPSPEED" and not isinstance(data.get("deepspeed_config") or {}, dict):
        raise ConfigError(
            "config", f"{str(path)!r}: deepspeed_config must be a mapping", "write deepspeed_config: {zero_stage: 2}"
        )
    out: dict[str, Any] = {}
    for f in FIELDS.values():
        for key in f.meta.accelerate_keys:
            if key.startswith("deepspeed_config.") and dist != "DEEPSPEED":
                continue
            value = _lookup(data, key, path)
            if value is not None and not _is_auto(value):
                out[f.name] = value
    # What a key alone cannot say: an unquoted `no` reads as false; use_cpu only ever forces
    # the CPU; a DeepSpeed file without a stage means stage 2 unless a JSON says; clipping 0 is none.
    if data.get("mixed_precision") is not None:
        out["precision"] = "no" if data["mixed_precision"] is False else str(data["mixed_precision"]).lower()
    if data.get("use_cpu") is True:
        out["force_cpu"] = True
    ds_file = None
    if dist == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        ds_file = ds.get("deepspeed_config_file")
        if ds_file is None:
            out.setdefault("zero", 2)
        if out.get("clip_norm") == 0:
            out["clip_norm"] = None  # accelerate and DeepSpeed write 0 for "no clipping"
        nvme = ds.get("offload_optimizer_nvme_path") or ds.get("offload_param_nvme_path")
        if nvme and nvme != "none":
            out["nvme_path"] = nvme
    elif dist == "FSDP":
        out["fsdp"] = True
    if ds_file is not None:
        relative = not Path(ds_file).is_absolute() and not Path(ds_file).exists()
        ds_file = str(Path(path).parent / ds_file if relative else ds_file)
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
    raise ConfigError(
        "config",
        f"{str(path)!r} is neither .yaml/.yml (accelerate) nor .json (DeepSpeed)",
        "pass an accelerate config YAML or a DeepSpeed JSON, like the files in configs/",
    )


def _env_bool(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(
        f"env {variable}", f"{raw!r} is not a boolean", f"set {variable}=true or {variable}=false, or unset it"
    )


def _env_int(variable: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(
            f"env {variable}", f"{raw!r} is not an integer", f"set {variable} to a whole number, or unset it"
        ) from None


def _env_value(name: str, variable: str, raw: str) -> Any:
    """An environment variable's text as field `name`'s type, or a ConfigError naming the variable."""
    f = FIELDS[name]
    if f.meta.env_parse is not None:
        return f.meta.env_parse(raw)
    if f.kind is bool:
        return _env_bool(variable, raw)
    if f.kind is int:
        return _env_int(variable, raw)
    return raw.strip().lower() if f.meta.choices is not None else raw.strip()


def read_environment(environ: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The environment variables of the source guides (each field's ``env``), one layer per variable set.

    ``USE_DEEPSPEED`` is no field's own: it turns DeepSpeed on (at ``DEEPSPEED_ZERO_STAGE``,
    else stage 2) or off.
    """
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    for f in FIELDS.values():
        for variable in f.meta.env:
            if variable in env and not (f.name == "zero" and "USE_DEEPSPEED" in env):
                layers.append((f"env:{variable}", {f.name: _env_value(f.name, variable, env[variable])}))
    if "USE_DEEPSPEED" in env:
        on = _env_bool("USE_DEEPSPEED", env["USE_DEEPSPEED"])
        stage = _env_int("DEEPSPEED_ZERO_STAGE", env.get("DEEPSPEED_ZERO_STAGE", "2"))
        layers.append(("env:USE_DEEPSPEED", {"zero": stage if on else None}))
    if "ENABLE_MIXED_PRECISION" in env:
        if not _env_bool("ENABLE_MIXED_PRECISION", env["ENABLE_MIXED_PRECISION"]):
            layers.append(("env:ENABLE_MIXED_PRECISION", {"precision": "no"}))
        elif "ACCELERATE_MIXED_PRECISION" not in env:  # on, without saying which: the flags' --fp16
            layers.append(("env:ENABLE_MIXED_PRECISION", {"precision": "fp16"}))
    if _env_bool("DEEPSPEED_CPU_CHECKPOINTING", env.get("DEEPSPEED_CPU_CHECKPOINTING", "")):
        raise ConfigError(
            "env DEEPSPEED_CPU_CHECKPOINTING",
            "DeepSpeed's CPU activation checkpointing applies to models that checkpoint through "
            "deepspeed.checkpointing; nexa_nb's --grad-ckpt (and transformers') checkpoint through torch",
            "unset DEEPSPEED_CPU_CHECKPOINTING; --grad-ckpt recomputes activations instead of keeping them, "
            "and --offload-param cpu moves the weights out of device memory",
        )
    return layers


CONFIG_FILE_VARIABLES = {"ACCELERATE_CONFIG_FILE": (".yaml", ".yml"), "DEEPSPEED_CONFIG_FILE": (".json",)}
"""Environment variables naming a config file, read as the config-file layer when no file is passed."""


def read_config_file_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The files that ``ACCELERATE_CONFIG_FILE`` and ``DEEPSPEED_CONFIG_FILE`` name, in that order,
    each layer's source saying which variable brought it (``env:DEEPSPEED_CONFIG_FILE (ds.json)``)."""
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    for variable, suffixes in CONFIG_FILE_VARIABLES.items():
        path = env.get(variable, "").strip()
        if not path:
            continue
        if Path(path).suffix.lower() not in suffixes or not Path(path).expanduser().is_file():
            kind = "accelerate config YAML" if ".yaml" in suffixes else "DeepSpeed JSON"
            raise ConfigError(
                f"env {variable}",
                f"{path!r} is not an existing {kind} file",
                f"point {variable} at one (like the files in configs/), or unset it",
            )
        layers += [(f"env:{variable} ({source})", values) for source, values in read_config_file(path)]
    return layers


# --- resolution and validation ----------------------------------------------------------


def resolve_config(
    *,
    config_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    session: Mapping[str, Any] | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the validated config from every layer (see the module docstring).

    `session` and `arguments` take any keyword of `nexa_nb.train`: a field's name, a flag's
    long name or alias (``offload="cpu"``), or a shortcut (``bf16=True``).
    """
    layers: list[tuple[str, Mapping[str, Any]]] = []
    # A file passed here replaces those the environment names, as accelerate's --config_file does.
    layers += read_config_file(config_file) if config_file is not None else read_config_file_variables(environ)
    layers += read_environment(environ)
    if session:
        layers.append(("session", canonical(session, "session")))
    if arguments:
        layers.append(("argument", canonical(arguments, "argument")))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for name, value in layer.items():
            values[name] = coerce(name, value, source)
            sources[name] = source
    cfg = replace(TrainConfig(), **values, sources=sources)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise `ConfigError` for the first bad value (`check_fields`) or impossible combination."""
    check_fields(cfg)

    def src(name):
        s = cfg.source_of(name)
        return "" if s in ("argument", "default") else f" (from {s})"

    def need(cond, name, problem, fix):
        if not cond:
            raise ConfigError(name, problem + src(name), fix)

    # DeepSpeed and FSDP
    need(
        not (cfg.fsdp and cfg.zero is not None),
        "fsdp",
        "FSDP and DeepSpeed ZeRO cannot be combined",
        "choose one: drop --zero for FSDP, or drop fsdp for ZeRO",
    )
    need(
        cfg.offload_optimizer == "none" or (cfg.zero or 0) >= 1,
        "offload_optimizer",
        f"optimizer offload needs ZeRO stage 1, 2 or 3 (stage is {cfg.zero})",
        "pass --zero 2 (or 3) with --offload",
    )
    need(
        cfg.offload_param == "none" or cfg.zero == 3,
        "offload_param",
        f"parameter offload needs ZeRO stage 3 (stage is {cfg.zero})",
        "pass --zero 3, or drop parameter offload",
    )
    if "nvme" in (cfg.offload_optimizer, cfg.offload_param):
        need(
            cfg.nvme_path is not None,
            "nvme_path",
            "NVMe offload needs a folder",
            "pass --nvme-path DIR (a local, writable folder)",
        )
        need(
            Path(cfg.nvme_path).is_dir(),
            "nvme_path",
            f"{cfg.nvme_path!r} is not an existing folder",
            "create it or pass another --nvme-path",
        )
        need(
            os.access(cfg.nvme_path, os.W_OK),
            "nvme_path",
            f"{cfg.nvme_path!r} is not writable",
            "pass a folder you can write to",
        )

    # batch arithmetic
    if cfg.batch_size == "auto":
        _check_auto_batch(cfg, need)
    elif cfg.target_batch is not None:
        world = cfg.procs * cfg.num_machines
        per_step = cfg.batch_size * world
        need(
            cfg.target_batch >= per_step and cfg.target_batch % per_step == 0,
            "target_batch",
            f"{cfg.target_batch} is not a multiple of batch_size x processes = {cfg.batch_size} x {world} = {per_step}",
            f"pass --target-batch {max(per_step, cfg.target_batch // per_step * per_step)} or change --batch-size",
        )
        derived = cfg.target_batch // per_step
        # a grad_accum from an earlier layer (say an accelerate YAML) gives way to the target batch
        earlier = cfg.source_of("grad_accum") == "default" or _layer_rank(cfg.source_of("grad_accum")) < _layer_rank(
            cfg.source_of("target_batch")
        )
        need(
            earlier or cfg.grad_accum == derived,
            "grad_accum",
            f"--grad-accum {cfg.grad_accum} contradicts --target-batch {cfg.target_batch} "
            f"(which needs {derived} with batch {cfg.batch_size} x {world} processes)",
            "pass only one of --grad-accum and --target-batch",
        )

    # memory plan
    need(
        cfg.memory_safety_margin < cfg.max_memory_usage,
        "memory_safety_margin",
        f"a margin of {cfg.memory_safety_margin} leaves nothing of max_memory_usage {cfg.max_memory_usage} "
        "to plan with",
        f"pass --memory-safety-margin below {cfg.max_memory_usage} (0.1 is the default)",
    )

    _check_folders(cfg, need)


def _check_auto_batch(cfg: TrainConfig, need) -> None:
    """--batch-size auto: the micro-batch is found by trying sizes on this machine before training,
    and the accumulation follows from it and --target-batch."""
    world = cfg.procs * cfg.num_machines
    if cfg.target_batch is not None:
        need(
            cfg.target_batch % world == 0,
            "target_batch",
            f"{cfg.target_batch} cannot be shared by {world} processes",
            f"pass --target-batch {max(world, cfg.target_batch // world * world)}",
        )
        given = cfg.source_of("grad_accum") != "default" and _layer_rank(cfg.source_of("grad_accum")) >= _layer_rank(
            cfg.source_of("target_batch")
        )
        need(
            not given,
            "grad_accum",
            f"--grad-accum {cfg.grad_accum} contradicts --target-batch {cfg.target_batch} with --batch-size auto "
            "(the accumulation follows from the micro-batch found)",
            "pass only one of --grad-accum and --target-batch",
        )
    need(
        cfg.slurm is None,
        "batch_size",
        "--batch-size auto tries micro-batches on this machine, and a Slurm job trains on another",
        "pass a number to --batch-size (a run here with --batch-size auto shows one that fits)",
    )


def _check_folders(cfg: TrainConfig, need) -> None:
    """The rules on checkpoints and the trained model's folder; `need` raises as `validate`'s does."""
    need(
        cfg.ckpt_every is None or cfg.ckpt_dir is not None,
        "ckpt_every",
        "a checkpoint interval needs a folder",
        "pass --ckpt-dir DIR as well",
    )
    need(
        cfg.resume != "latest" or cfg.ckpt_dir is not None,
        "resume",
        "resume='latest' needs a checkpoint folder",
        "pass --ckpt-dir DIR, or --resume with a checkpoint path",
    )
    if cfg.ckpt_dir is not None:
        _check_writable_dir(cfg.ckpt_dir, "ckpt_dir", "--ckpt-dir")
    if cfg.resume is not None and cfg.resume != "latest":
        need(
            Path(cfg.resume).is_dir(),
            "resume",
            f"checkpoint {cfg.resume!r} does not exist",
            "pass a folder written by a previous run (ckpt_dir/step-0000010), or 'latest'",
        )
    # the trained model
    need(
        not cfg.merge_lora or cfg.lora,
        "merge_lora",
        "merging LoRA adapters needs LoRA training",
        "pass --lora as well, or drop --merge-lora",
    )
    if cfg.output_dir is not None:
        _check_writable_dir(cfg.output_dir, "output_dir", "--output-dir")


def _layer_rank(source: str) -> int:
    """Where a source sits in the layer order: default < file < env < session < argument."""
    if source == "default":
        return 0
    if source.startswith("env:") and source.split()[0].removeprefix("env:") not in CONFIG_FILE_VARIABLES:
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
        raise ConfigError(
            name, f"{path!r} cannot be written ({probe} is not writable)", f"pass a writable folder to {flag}"
        )
