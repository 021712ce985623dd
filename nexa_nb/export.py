"""From notebook to ``accelerate launch``: a standalone script that runs the same task.

`export_script` writes three files:

* the script: it loads the task, takes the resolved config values, re-plans for the world
  that ``accelerate launch`` started, and calls `nexa_nb.engine.run`, the loop the notebook
  uses, so that the same task and seed give the same losses; its rank 0 writes the trained
  model into the output folder decided at export (``plan.resolve_output_dir``) and prints where;
* an accelerate config YAML (`accelerate_yaml`);
* when some of the task cannot be imported, ``<script>.task.pkl``: those parts, by value.

The task travels by reference where it can: functions and classes defined in a module, and
datasets that are a module's global, are imported by the script.  Everything else (what the
notebook defined in ``__main__``, data built in a cell, a model instance with its current
weights) is saved by value with ``torch.save`` and cloudpickle.

What ``accelerate launch`` needed (accelerate 1.15):

* ``distributed_type: MULTI_CPU`` starts one process unless accelerate runs mpirun, so
  several CPU processes are written as ``MULTI_GPU`` with ``use_cpu: true``: accelerate
  launch then starts them with torchrun (one machine or several), and the engine's own
  ``Accelerator(cpu=True)`` trains as MULTI_CPU over gloo, as the plan says. The launcher
  does not pass ``use_cpu`` on to the workers: a script that builds a plain ``Accelerator()``
  needs ``ACCELERATE_USE_CPU=1`` in its environment, or every process trains alone as
  DistributedType.NO (the YAML's header says so).
* For DeepSpeed, accelerate launch turns the YAML's ``deepspeed_config`` into ``ACCELERATE_*``
  variables, and Accelerate refuses them next to the complete DeepSpeed config of the plan;
  the script removes them and sets the plan's own worker variables, as the notebook launcher
  does.  ``deepspeed_multinode_launcher: standard`` makes several machines use torchrun
  rather than pdsh.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import pprint
import shlex
import string
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from nexa_nb.config import ConfigError, TrainConfig
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan, make_plan, resolve_output_dir
from nexa_nb.runs import secret_values
from nexa_nb.task import Task


@dataclass(frozen=True)
class ExportedFiles:
    script: str
    accelerate_config: str
    task_file: str | None
    """The pickle holding the parts of the task passed by value; None when all are imported."""
    command: str
    """How to run it on this machine."""
    explanation: str
    """What was exported and how, how to run it on several machines, what to trust."""


# --- accelerate config ------------------------------------------------------------------


def _launch_type(plan: Plan, world: int) -> str:
    """The distributed_type that makes ``accelerate launch`` start `world` processes."""
    if plan.uses_deepspeed:
        return "DEEPSPEED"
    if plan.config.fsdp:
        return "FSDP"
    return "MULTI_GPU" if world > 1 else "NO"


def accelerate_yaml(config: TrainConfig, *, num_machines: int = 1) -> str:
    """The accelerate config for `config`, with `config.procs` processes on each machine.

    The keys are those ``accelerate config`` writes; a header comment says what runs.
    Options that accelerate has no key for (micro-batch, learning rate, ...) stay with the
    exported script or the notebook session.
    """
    import yaml

    if num_machines < 1:
        raise ConfigError("num_machines", f"must be at least 1, got {num_machines}", "pass 1 or more")
    plan = make_plan(config)
    world = config.procs * num_machines
    dist = _launch_type(plan, world)
    data: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": dist,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": plan.precision,
        "num_machines": num_machines,
        "num_processes": world,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": plan.device == "cpu",
    }
    if plan.uses_deepspeed:
        ds: dict[str, Any] = {
            "deepspeed_multinode_launcher": "standard",
            "gradient_accumulation_steps": plan.grad_accum,
            "gradient_clipping": config.clip_norm or 0.0,  # 0: no clipping
            "offload_optimizer_device": config.offload_optimizer,
            "offload_param_device": config.offload_param,
            "zero3_init_flag": False,
            "zero_stage": config.zero,
        }
        if config.offload_optimizer == "nvme":
            ds["offload_optimizer_nvme_path"] = config.nvme_path
        if config.offload_param == "nvme":
            ds["offload_param_nvme_path"] = config.nvme_path
        data["deepspeed_config"] = ds

    backend = {
        "DEEPSPEED": f"DeepSpeed ZeRO-{config.zero}",
        "FSDP": "FSDP",
        "MULTI_GPU": "Data parallel",
        "NO": "Single process",
    }[dist]
    precision = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[plan.precision]
    count = f"{config.procs} {plan.device.upper()} process{'es' if config.procs > 1 else ''}"
    if num_machines > 1:
        count = f"{num_machines} machines x {count}"
    header = [f"# {backend}, {precision}: {count}. Written by nexa_nb with the keys `accelerate config` writes."]
    if dist == "MULTI_GPU" and plan.device == "cpu":
        header += [
            "# CPU processes: MULTI_GPU with use_cpu makes `accelerate launch` start them with torchrun",
            "# (MULTI_CPU would start one process without mpirun). accelerate launch does not tell the",
            "# workers to use the CPU: nexa_nb's script builds Accelerator(cpu=True); for a script of",
            "# your own, run `ACCELERATE_USE_CPU=1 accelerate launch ...`, or each process trains alone.",
        ]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=True)


def save_accelerate_config(config: TrainConfig, path: str | os.PathLike) -> str:
    """Write `accelerate_yaml(config)` to `path` atomically; return the path."""
    _write_all({Path(path): accelerate_yaml(config).encode()})
    return str(path)


# --- how each part of the task travels ----------------------------------------------------


def _attribute(module_name: str, dotted: str) -> Any:
    """``module.a.b`` for ``dotted == "a.b"``."""
    obj = sys.modules[module_name]
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _importable_module(name: str | None) -> bool:
    return (
        bool(name)
        and name not in ("__main__", "__mp_main__", "builtins")
        and name in sys.modules
        and all(part.isidentifier() for part in name.split("."))
    )


def _code_reference(obj: Any) -> tuple[str, str] | None:
    """(module, qualified name) of a function or class that importing gives back, else None."""
    if not isinstance(obj, (types.FunctionType, type)):
        return None
    module, qualname = getattr(obj, "__module__", None), obj.__qualname__
    if not _importable_module(module) or "<" in qualname:
        return None
    try:
        return (module, qualname) if _attribute(module, qualname) is obj else None
    except AttributeError:
        return None


def _global_reference(obj: Any) -> tuple[str, str] | None:
    """(module, name) of a module's global that is this very object, else None."""
    for module_name, module in list(sys.modules.items()):
        if not _importable_module(module_name) or module_name.startswith(("_", "IPython", "ipykernel")):
            continue
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is obj and name.isidentifier() and not name.startswith("_"):
                return module_name, name
    return None


def _reference(field_name: str, value: Any) -> tuple[str, str] | None:
    """How the script can import this part of the task, or None to pass it by value.

    Data is imported only when it is a module's global; a model instance always goes by
    value, since its current weights are part of the task.
    """
    from torch import nn

    if field_name in ("train_data", "eval_data"):
        return _global_reference(value)
    if isinstance(value, nn.Module):
        return None
    return _code_reference(value)


class _TaskPickler(cloudpickle.Pickler):
    """cloudpickle, refusing open files, and noting in `imported` the modules loading will import.

    cloudpickle would save the contents of a file open for reading: a copy of the file at
    export time, where the task meant to read the file itself.
    """

    def __init__(self, file, protocol=None, imported: set[str] | None = None):
        super().__init__(file, protocol=protocol)
        self.imported = set() if imported is None else imported

    def reducer_override(self, obj):
        if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
            raise TypeError(f"cannot save an open file ({getattr(obj, 'name', '?')!r})")
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented and isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            self.imported.add(getattr(obj, "__module__", None) or "builtins")  # saved by name, imported on load
        elif isinstance(obj, types.ModuleType):
            self.imported.add(obj.__name__)
        return reduced


def _save_by_value(obj: Any) -> tuple[bytes, set[str]]:
    """`obj` as ``torch.save`` writes it with cloudpickle, and the modules loading it imports.

    ``torch.save`` stores each tensor storage once, where plain pickle would copy a whole
    storage for every view of it (a dataset of rows sliced from one tensor).
    """
    import torch

    modules: set[str] = set()

    class Pickler(_TaskPickler):  # torch.save builds the pickler itself: hand it the set to fill
        def __init__(self, file, protocol=None):
            super().__init__(file, protocol, imported=modules)

    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_module=types.SimpleNamespace(__name__="cloudpickle", Pickler=Pickler))
    return buffer.getvalue(), modules


def _describe(value: Any) -> str:
    if isinstance(value, (types.FunctionType, type)):
        return f"{value.__qualname__} (defined in {value.__module__})"
    try:
        size = f" of {len(value)} items"
    except TypeError:
        size = ""
    return f"a {type(value).__name__}{size}"


# --- unserialisable tasks ------------------------------------------------------------------


def _parts(obj: Any) -> list[tuple[str, Any]]:
    """The named parts that pickling `obj` saves too: items, attributes, a function's variables."""
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj[:10_000])]
    if isinstance(obj, types.FunctionType):
        cells = zip(obj.__code__.co_freevars, obj.__closure__ or ())
        named = [(name, cell.cell_contents) for name, cell in cells if cell.cell_contents is not None]
        named += [(name, obj.__globals__[name]) for name in obj.__code__.co_names if name in obj.__globals__]
        return [(f".{name}", v) for name, v in named if not isinstance(v, types.ModuleType)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return [(f".{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]


def _culprit(obj: Any, path: str, seen: set[int], depth: int = 0) -> tuple[str, Any, BaseException] | None:
    """The deepest part of `obj` that cannot be pickled on its own, with the error."""
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    try:
        _TaskPickler(io.BytesIO()).dump(obj)
        return None
    except Exception as exc:
        error = exc
    if depth < 6:
        for name, part in _parts(obj):
            found = _culprit(part, path + name, seen, depth + 1)
            if found:
                return found
    return path, obj, error


def _unserialisable(
    task_var: str, by_value: dict[str, Any], error: BaseException, action: str = "export the task"
) -> TrainingError:
    found = None
    for name, value in by_value.items():
        found = _culprit(value, f"{task_var}.{name}", set())
        if found:
            break
    where, obj, error = found or (task_var, None, error)
    what = f" is a {type(obj).__name__}, which" if obj is not None else ""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return TrainingError(
        f"cannot {action}: {where}{what} cannot be saved ({type(error).__name__}: {reason}); "
        "define it in a module, where the script can import it, or make the task's data a list or a torch Dataset"
    )


def task_by_value(task: Task, task_var: str = "task") -> bytes:
    """The whole task saved by value (``torch.save`` with cloudpickle), for a process of its own
    to load with `task_from_bytes`; a part that cannot be saved raises the `TrainingError` naming it."""
    by_value = {f.name: getattr(task, f.name) for f in dataclasses.fields(Task) if getattr(task, f.name) is not None}
    try:
        return _save_by_value(by_value)[0]
    except Exception as exc:
        raise _unserialisable(task_var, by_value, exc, "detach the run") from None


def task_from_bytes(data: bytes) -> Task:
    import torch

    return Task(**torch.load(io.BytesIO(data), weights_only=False))


# --- secrets and files -----------------------------------------------------------------------


def _check_no_secrets(files: dict[Path, bytes]) -> None:
    """Refuse to write the value of a secret-looking environment variable (a tracker token...)."""
    for value, name in secret_values().items():
        for path, data in files.items():
            if value.encode() in data:
                raise TrainingError(
                    f"cannot export the task: the value of ${name} would be written into {path.name}; "
                    "read it from os.environ inside your code instead of storing it in the task"
                )


def _write_all(files: dict[Path, bytes]) -> None:
    """Write every file whole or not at all: each into a temporary file beside it, then renamed."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            written.append((tmp, path))
            with open(tmp, "xb") as f:
                f.write(data)
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise


# --- the script ------------------------------------------------------------------------------


def sbatch_script(spec: str, command: str, script: Path) -> str:
    """An sbatch script that runs `command` as a job of one node. Its options come from the parsed
    spec (known keys, checked values: `slurm.parse_spec`), never from the spec's text."""
    from nexa_nb.slurm import NAME, parse_spec

    options = {"job_name": "nexa", **parse_spec(spec), "nodes": 1, "ntasks_per_node": 1}
    if NAME.fullmatch(script.stem):  # sbatch reads this line without a shell: a plain name only
        options["output"] = f"{script.stem}.%j.out"
    lines = ["#!/bin/bash", "# Written by nexa_nb %nexa_export --slurm: the exported script as a Slurm job."]
    lines += [f"#SBATCH --{name.replace('_', '-')}={value}" for name, value in options.items()]
    return "\n".join([*lines, "", command, ""])


def launcher() -> list[str]:
    """``accelerate launch`` through the kernel's own Python: it runs as printed from a shell whose
    PATH lacks the environment's ``accelerate`` (a kernel started without activating it)."""
    return [sys.executable, "-m", "accelerate.commands.launch"]


_SCRIPT = string.Template('''\
r"""Train the nexa_nb task $name (`$task_var` in the notebook) under accelerate launch.

    $command [--history-out losses.json]

Exported by nexa_nb $versions.
"""

$imports

from nexa_nb import Task, engine
from nexa_nb.config import resolve_config
from nexa_nb.plan import make_plan
from nexa_nb.sinks.console import ConsoleSink

# The notebook's resolved options; procs and num_machines are replaced by what was launched.
# output_dir was decided at export, so that every rank of every machine names the same folder.
CONFIG = $config


def load_task():
$load_task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history-out", metavar="PATH", help="write the loss history (JSON) here from rank 0")
    args = parser.parse_args()

    # Plan for the world accelerate launch started (processes per machine x machines). The
    # values above are complete: no environment variable may change them (environ={}).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    config = resolve_config(environ={}, arguments={**CONFIG, "procs": local, "num_machines": world // local})
    plan = make_plan(config)

    task = load_task()
    rank = int(os.environ.get("RANK", "0"))
    sink = ConsoleSink()
    outcome = engine.run(plan, task, sink.handle if rank == 0 else lambda event: None)
    if outcome.status == "completed" and torch.distributed.is_initialized():
        # Gloo's threads may otherwise abort a finished process as the interpreter exits
        # ("terminate called without an active exception"), and accelerate launch reports it failed.
        torch.distributed.destroy_process_group()
    if rank == 0 and args.history_out:
        result = {"final_loss": outcome.final_loss, "distributed_type": outcome.distributed_type,
                  "num_processes": outcome.num_processes, "history": outcome.history,
                  "model_dir": outcome.model_dir}
        Path(args.history_out).write_text(json.dumps(result, indent=1))
    if rank == 0 and outcome.model_dir:
        print(f"trained model written to {outcome.model_dir}", flush=True)
    if outcome.status != "completed":
        raise SystemExit(f"training {outcome.status}: {outcome.message}")


if __name__ == "__main__":
    main()
''')


def _load_task_source(references: dict[str, tuple[str, str]], name: str, task_file: str | None) -> str:
    """The body of the script's ``load_task``."""
    lines = [
        '    """The task: imported where it comes from a module, the rest from its pickle."""'
        if task_file
        else '    """The task, imported from the modules that define it."""'
    ]
    lines += [f"    import {module}" for module in sorted({module for module, _ in references.values()})]
    arguments = [f"{field}={module}.{attr}" for field, (module, attr) in references.items()] + [f"name={name!r}"]
    if task_file:
        lines += [
            f"    # {task_file} holds the rest of the task by value (torch.save with cloudpickle): it is code",
            "    # as well as data, so load it only from a trusted source, with the same package versions.",
            f"    by_value = torch.load(Path(__file__).with_name({task_file!r}), weights_only=False)",
        ]
        arguments.append("**by_value")
    lines += ["    return Task(", *(f"        {argument}," for argument in arguments), "    )"]
    return "\n".join(lines)


def _script(
    task: Task,
    task_var: str,
    config: TrainConfig,
    command: str,
    references: dict[str, tuple[str, str]],
    task_file: str | None,
) -> str:
    import torch

    from nexa_nb import __version__

    imports = [
        "import argparse",
        "import json",
        "import os",
        "from pathlib import Path",
        "",
        "import torch",
    ]
    versions = (
        f"{__version__} (torch {torch.__version__}, cloudpickle {cloudpickle.__version__}, "
        f"Python {platform.python_version()})"
    )
    values = config.as_dict()
    values["output_dir"] = resolve_output_dir(config, task.name)
    for name in ("run_dir", "detach", "slurm"):  # the script writes no run record and runs where it is started
        del values[name]
    if config.target_batch is not None:
        del values["grad_accum"]  # derived from target_batch for the world the script runs in
    config_literal = pprint.pformat(values, sort_dicts=False, width=100)
    return _SCRIPT.substitute(
        name=json.dumps(task.name),
        task_var=task_var,
        command=command,
        versions=versions,
        imports="\n".join(imports),
        config=config_literal.replace("\n", "\n" + " " * len("CONFIG = ")),
        load_task=_load_task_source(references, task.name, task_file),
    )


def _required_modules(names: set[str]) -> list[str]:
    """Top-level packages, leaving out the standard library."""
    tops = {name.split(".")[0] for name in names}
    return sorted(t for t in tops if t not in sys.stdlib_module_names and t not in ("builtins", "__main__"))


def export_script(
    task: Task,
    config: TrainConfig,
    script_path: str | os.PathLike,
    *,
    task_var: str = "task",
    accelerate_config_path: str | os.PathLike | None = None,
) -> ExportedFiles:
    """Write a script that trains `task` with `config` under ``accelerate launch`` as the
    notebook does, its accelerate config, and the parts of the task passed by value.

    `task_var` is the task's name in the notebook, for messages. The accelerate config goes
    to `accelerate_config_path` (default: ``<script>.accelerate.yaml``), the task's pickle to
    ``<script>.task.pkl``. Raises `TrainingError` (one line) when the task cannot be saved or
    would carry a secret, `ConfigError` for --batch-size auto; nothing is written then.
    """
    if not isinstance(task, Task):
        raise TrainingError(f"expected a nexa_nb.Task, got {type(task).__name__}")
    if not task_var.isidentifier():
        raise TrainingError(f"task_var must be a Python name, got {task_var!r}")
    if config.batch_size == "auto":  # the sizes are tried by the notebook's launch, which a script has not
        raise ConfigError(
            "batch_size",
            "--batch-size auto tries micro-batches before a run from the notebook, and an exported script "
            "trains without that search",
            "pass a number to --batch-size (a run here with --batch-size auto shows one that fits)",
        )
    script = Path(script_path)
    yaml_path = (
        Path(accelerate_config_path) if accelerate_config_path is not None else script.with_suffix(".accelerate.yaml")
    )
    pkl_path = script.with_suffix(".task.pkl")
    if script.stem in {name.split(".")[0] for name in sys.modules}:
        raise TrainingError(
            f"cannot export the task: a script named {script.name} would be imported instead of "
            f"the module {script.stem!r} when it runs; give the script another name"
        )
    plan = make_plan(config)

    references: dict[str, tuple[str, str]] = {}
    by_value: dict[str, Any] = {}
    for f in dataclasses.fields(Task):
        value = getattr(task, f.name)
        if value is None or f.name == "name":
            continue
        reference = _reference(f.name, value)
        if reference:
            references[f.name] = reference
        else:
            by_value[f.name] = value

    files: dict[Path, bytes] = {}
    modules = {module for module, _ in references.values()}
    if by_value:
        try:
            files[pkl_path], imported = _save_by_value(by_value)
        except Exception as exc:
            raise _unserialisable(task_var, by_value, exc) from None
        modules |= imported
    task_file = pkl_path if by_value else None

    command = shlex.join([*launcher(), "--config_file", str(yaml_path), str(script)])
    files[script] = _script(task, task_var, config, command, references, task_file and task_file.name).encode()
    files[yaml_path] = accelerate_yaml(config).encode()
    sbatch_path = script.with_suffix(".sbatch")
    if config.slurm is not None:
        files[sbatch_path] = sbatch_script(config.slurm, command, script).encode()
    _check_no_secrets(files)
    _write_all(files)

    explanation = _explain(
        task_var, config, plan, script, yaml_path, task_file, references, by_value, _required_modules(modules), command
    )
    if config.slurm is not None:
        explanation += f"\nFor Slurm: {sbatch_path} runs the same command as a job of one node: sbatch {sbatch_path}"
    return ExportedFiles(
        script=str(script),
        accelerate_config=str(yaml_path),
        task_file=str(task_file) if task_file else None,
        command=command,
        explanation=explanation,
    )


def _explain(
    task_var: str,
    config: TrainConfig,
    plan: Plan,
    script: Path,
    yaml_path: Path,
    task_file: Path | None,
    references: dict[str, tuple[str, str]],
    by_value: dict[str, Any],
    modules: list[str],
    command: str,
) -> str:
    lines = [
        f"Exported {task_var} ({plan.describe().splitlines()[0]}) for accelerate launch:",
        f"  {script}: the script; {yaml_path}: its accelerate config"
        + (f"; {task_file}: the parts of the task passed by value" if task_file else "")
        + ".",
        "How the task travels:",
    ]
    lines += [f"  {field}: by reference, imported as {module}.{attr}" for field, (module, attr) in references.items()]
    lines += [f"  {field}: by value, {_describe(value)}" for field, value in by_value.items()]
    if modules:
        lines.append(
            f"  Loading it imports {', '.join(modules)}: these must be importable where the script runs "
            "(installed, or on PYTHONPATH), at the versions used here."
        )
    if task_file:
        lines.append(
            f"  {task_file.name} is written by torch.save with cloudpickle: it holds code as well as data, "
            "so load it only from a trusted source, with the same versions of Python, torch, nexa_nb and "
            "cloudpickle."
        )
    # A one-process config says NO, which accelerate launch starts as a single process anywhere.
    multi = " --multi_gpu" if _launch_type(plan, 2 * config.procs) != _launch_type(plan, config.procs) else ""
    lines += [
        f"Run on this machine: {command}",
        "  (the script's --history-out FILE keeps the losses as JSON).",
        "On 2 machines, each with the script, its files and the same packages, run on machine R = 0 and R = 1:",
        (
            f"  {shlex.join(launcher())} --config_file {shlex.quote(str(yaml_path))}{multi} --num_machines 2 "
            f"--num_processes {2 * config.procs} --machine_rank R --main_process_ip IP --main_process_port P "
            f"{shlex.quote(str(script))}"
        ),
        "  with IP and P the address and a free port of machine 0; --num_processes counts all machines' processes.",
        (
            "The script plans for the processes it is launched with: the effective batch grows with their number "
            "unless target_batch is set."
        ),
        "No environment variable is written into these files: set tracker tokens and the like on each machine.",
    ]
    return "\n".join(lines)
