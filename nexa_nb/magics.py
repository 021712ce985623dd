"""The ``%nexa_*`` magics: thin commands over the Python API.

Each magic parses its arguments, calls the core and shows the outcome; none trains by itself:

    %nexa_train   [TASK] [flags]      train a nexa_nb.Task, return its TrainResult
    %nexa_config  [flags]             set defaults for later runs, or show the resolved config
    %nexa_plan    [TASK] [--params N] memory per ZeRO stage and offload, and a recommendation
    %nexa_status  [--traceback]       devices, versions, the current setup and the last run
    %nexa_export  SCRIPT [TASK]       write a script for ``accelerate launch``

Flags are the Python API's keywords with dashes (``--grad-accum 4`` is ``grad_accum=4``);
only the flags typed reach the core as arguments, so the others fall through to the
``%nexa_config`` defaults, the environment and the config file (see `nexa_nb.config`).
Persistent options: ``%config NexaMagics.default_task = "my_task"`` (also ``dashboard`` and
``refresh_interval``).

Loading the magics imports neither torch nor DeepSpeed; they load when a run starts.
"""

from __future__ import annotations

import argparse
import shlex
import importlib
import importlib.metadata
from contextlib import contextmanager
from dataclasses import replace

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import (
    ArgDecorator,
    argument,
    argument_group,
    magic_arguments,
    real_name,
)
from traitlets import Bool, Float, Unicode

from nexa_nb import api, memory
from nexa_nb.config import FIELD_NAMES, LR_SCALING, OFFLOAD_DEVICES, SCHEDULERS, ConfigError, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.events import RunStarted
from nexa_nb.hardware import probe
from nexa_nb.plan import make_plan
from nexa_nb.task import Task

GiB = 2**30
VERSIONED = ("torch", "accelerate", "deepspeed", "transformers", "peft", "nexa-nb")


# --- arguments ------------------------------------------------------------------------------

class one_of(ArgDecorator):
    """Flags that exclude each other: ``[--fp16 | --bf16 | --fp32]`` in the help."""

    def __init__(self, *flags: tuple[tuple[str, ...], dict]):
        self.flags = flags

    def add_to_parser(self, parser, group):
        exclusive = (group or parser).add_mutually_exclusive_group()
        for names, options in self.flags:
            exclusive.add_argument(*names, **options)


# What `--zero none` and `--clip-norm none` parse to: None itself would read as "not typed".
TYPED_NONE = type("TypedNone", (), {"__repr__": lambda self: "none"})()


def _zero_stage(text: str):
    """--zero 0..3, or none: no DeepSpeed (to override a default set by %nexa_config)."""
    if text.lower() == "none":
        return TYPED_NONE
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeRO stage; use 0, 1, 2, 3 or none")
    return int(text)


def _clip_norm(text: str):
    """--clip-norm F, or none: no clipping."""
    if text.lower() == "none":
        return TYPED_NONE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a positive number or none") from None


def _precision(flag: str, value: str, text: str):
    return (flag,), dict(dest="precision", action="store_const", const=value, help=text)


# Shared by %nexa_train, %nexa_config and %nexa_export. Every default is None, so a flag
# that is not typed stays out of the "argument" layer.
CONFIG_FLAGS = (
    argument_group("DeepSpeed ZeRO and offload"),
    argument("--zero", type=_zero_stage, metavar="{0,1,2,3,none}",
             help="DeepSpeed ZeRO stage (zero=). Without it, or with none: plain Accelerate, DDP for several "
                  "processes."),
    argument("--offload", "--offload-optimizer", dest="offload_optimizer", choices=OFFLOAD_DEVICES,
             help="where the optimizer state lives (offload_optimizer=), ZeRO 1-3. It moves the optimizer "
                  "only: --zero 3 --offload cpu keeps the parameters on the device; add --offload-param "
                  "cpu to move them too."),
    argument("--offload-param", choices=OFFLOAD_DEVICES,
             help="where the parameters live (offload_param=), ZeRO-3 only."),
    argument("--nvme-path", metavar="DIR", help="existing, writable folder for nvme offload (nvme_path=)."),
    argument_group("precision"),
    one_of(_precision("--fp16", "fp16", "fp16 mixed precision (precision='fp16'); on a CPU it falls back to bf16 "
                                        "with a note."),
           _precision("--bf16", "bf16", "bf16 mixed precision (precision='bf16')."),
           _precision("--fp32", "no", "full fp32 (precision='no').")),
    argument("--strict", action=argparse.BooleanOptionalAction, default=None,
             help="make every fallback (fp16 on a CPU, ...) an error instead of a note (strict=True)."),
    argument_group("batch"),
    argument("--batch-size", type=int, metavar="N", help="micro-batch per process (batch_size=)."),
    argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (grad_accum=)."),
    argument("--target-batch", type=int, metavar="N",
             help="effective batch wanted; the accumulation is derived from it (target_batch=)."),
    argument("--procs", type=int, metavar="N", help="worker processes: GPUs, or CPU processes (procs=)."),
    argument("--force-cpu", action=argparse.BooleanOptionalAction, default=None,
             help="train on the CPU even when GPUs are present (force_cpu=True)."),
    argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
             help="shard the model with PyTorch FSDP instead of ZeRO, GPUs only (fsdp=True)."),
    argument("--find-unused-parameters", action=argparse.BooleanOptionalAction, default=None,
             help="DDP: allow parameters that take no part in the loss (find_unused_parameters=True)."),
    argument_group("schedule"),
    argument("--epochs", type=int, metavar="N", help="passes over the data (epochs=)."),
    argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (max_steps=)."),
    argument("--lr", type=float, metavar="F", help="peak learning rate of AdamW (lr=)."),
    argument("--lr-scaling", choices=LR_SCALING,
             help="scale --lr with the effective batch: none, linear or sqrt (lr_scaling=)."),
    argument("--weight-decay", type=float, metavar="F", help="AdamW weight decay (weight_decay=)."),
    argument("--warmup-steps", type=int, metavar="N", help="linear warm-up from 0 to --lr (warmup_steps=)."),
    argument("--scheduler", choices=SCHEDULERS, help="learning rate after warm-up (scheduler=)."),
    argument("--clip-norm", type=_clip_norm, metavar="F|none",
             help="clip the gradient norm to F; none turns clipping off (clip_norm=)."),
    argument("--seed", type=int, metavar="N", help="seed for weights, data order and dropout (seed=)."),
    argument_group("model"),
    argument("--lora", action=argparse.BooleanOptionalAction, default=None,
             help="train LoRA adapters only (lora=True); --no-lora turns off a default."),
    argument("--lora-r", type=int, metavar="N", help="LoRA rank (lora_r=)."),
    argument("--lora-alpha", type=int, metavar="N", help="LoRA scale numerator (lora_alpha=)."),
    argument("--lora-dropout", type=float, metavar="F", help="dropout on the LoRA branch (lora_dropout=)."),
    argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
             help="gradient checkpointing: recompute activations to save memory (grad_ckpt=True)."),
    argument_group("checkpoints"),
    argument("--ckpt-dir", metavar="PATH", help="folder for checkpoints (ckpt_dir=)."),
    argument("--ckpt-every", type=int, metavar="N", help="save every N optimizer steps (ckpt_every=)."),
    argument("--eval-every", type=int, metavar="N",
             help="evaluate the task's eval data every N optimizer steps, and at the end (eval_every=)."),
    argument("--resume", metavar="PATH|latest", help="continue from a checkpoint folder, or the newest in "
                                                     "--ckpt-dir (resume=)."),
    argument_group("files"),
    argument("--config", metavar="FILE", help="accelerate config YAML or DeepSpeed JSON, layered under the "
                                              "flags (config=)."),
)


def config_flags(func):
    """Add `CONFIG_FLAGS` to a magic, in the order they are listed."""
    for decorator in reversed(CONFIG_FLAGS):
        func = decorator(func)
    return func


def options_of(args) -> dict:
    """The flags typed, as `TrainConfig` fields: the "argument" layer of the configuration."""
    return {name: None if value is TYPED_NONE else value for name, value in vars(args).items()
            if name in FIELD_NAMES and value is not None}


# argparse's problem statements and the fix for each.
_ARGPARSE_FIXES = (
    ("unrecognized arguments", "remove them"),
    ("not allowed with argument", "keep only one of the two flags"),
    ("expected one argument", "give the flag a value"),
    ("invalid choice", "use one of the values listed"),
    ("invalid", "give a value of the right type"),
    ("closing quotation", "close the quote"),
)


def _did_you_mean(parser, problem: str) -> str | None:
    """'did you mean --zero?' for a mistyped flag."""
    import difflib

    known = [flag for action in parser._actions for flag in action.option_strings]
    typed = [word for word in problem.split(":", 1)[-1].split() if word.startswith("--")]
    close = [difflib.get_close_matches(word, known, n=1) for word in typed]
    suggestions = [(word, match[0]) for word, match in zip(typed, close) if match]
    if not suggestions:
        return None
    if len(suggestions) == 1:
        return f"did you mean {suggestions[0][1]}?"
    return "did you mean " + ", ".join(f"{match} for {word}" for word, match in suggestions) + "?"


def parse(magic, line: str):
    """Parse a magic's line; argparse's complaint becomes one UsageError line with the fix."""
    magic.parser.allow_abbrev = False  # "--zer 3" is a typo to report, not --zero 3
    try:
        # posix splitting: --ckpt-dir "my runs" is the folder my runs, without the quotes
        return magic.parser.parse_args(shlex.split(line))
    except (UsageError, ValueError) as exc:
        problem = " ".join(str(exc).split()).rstrip(".")
        fix = next((fix for key, fix in _ARGPARSE_FIXES if key in problem), "correct the line")
        if "unrecognized arguments" in problem:
            fix = _did_you_mean(magic.parser, problem) or fix
        raise UsageError(f"{problem}. Fix: {fix} (%{real_name(magic)}? lists every flag).") from None


@contextmanager
def core_errors(*more):
    """The core's ConfigError and TrainingError (and the error types in `more`) as one UsageError line."""
    try:
        yield
    except (ConfigError, TrainingError, *more) as exc:
        raise UsageError(one_line(exc)) from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --- display helpers -------------------------------------------------------------------------

class PlanNotesShown:
    """Console output for a run whose plan was printed already: its notes are not repeated."""

    def __init__(self, sink):
        self.sink = sink

    def handle(self, event) -> None:
        self.sink.handle(replace(event, notes=()) if isinstance(event, RunStarted) else event)

    def close(self) -> None:
        self.sink.close()


def table(rows, header) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in (header, *rows))


def setup_flags(setup) -> str:
    """The %nexa_train flags of a memory-table row or a recommendation ("" for plain Accelerate)."""
    if setup.stage is None:
        return ""
    flags = f"--zero {setup.stage}"
    if setup.offload_optimizer != "none":
        flags += f" --offload {setup.offload_optimizer}"
    if setup.offload_param != "none":
        flags += f" --offload-param {setup.offload_param}"
    return flags


def positive(kind):
    """An argparse type: a number of `kind` above 0."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}, expected a number above 0")
        return value

    return convert


def parse_count(text: str) -> int:
    """``7e9``, ``7B``, ``350M``, ``125_000`` -> a parameter count of at least 1."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(text[-1:].upper(), 1)
    try:
        count = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}, write a positive count such as 350M, 7B or 7e9")
    return count


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --- the magics ------------------------------------------------------------------------------

@magics_class
class NexaMagics(Magics):
    """Train, plan and configure nexa_nb runs from a notebook (``%load_ext nexa_nb``)."""

    default_task = Unicode("task", help="Name of the notebook variable holding the nexa_nb.Task that "
                                        "%nexa_train, %nexa_plan and %nexa_export use when no TASK is given."
                           ).tag(config=True)
    refresh_interval = Float(0.25, help="Seconds between redraws of the live dashboard.").tag(config=True)
    dashboard = Bool(True, help="Show the live dashboard during %nexa_train; False prints console lines "
                                "instead.").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.session: dict = {}
        """Defaults set by %nexa_config: TrainConfig fields, the "session" layer."""
        self.config_file: str | None = None
        """The --config FILE given to %nexa_config, used when %nexa_train gets none."""
        self.last_error: TrainingError | None = None
        """The failure of the last %nexa_train, if it failed (its worker traceback included)."""

    def task_named(self, name: str | None) -> Task:
        name = name or self.default_task
        if name not in self.shell.user_ns:
            raise UsageError(f"there is no variable {name!r} in this notebook. Fix: define it, e.g. "
                             f"{name} = nexa_nb.Task(model, train_data), or pass the name of your task.")
        task = self.shell.user_ns[name]
        if not isinstance(task, Task):
            raise UsageError(f"{name!r} is a {type(task).__name__}, not a nexa_nb.Task. Fix: wrap your model "
                             f"and data: {name} = nexa_nb.Task(model, train_data).")
        return task

    def resolved(self, args=None):
        """The configuration a run would use: defaults set so far, then the flags in `args`."""
        config_file = getattr(args, "config", None) or self.config_file
        options = options_of(args) if args is not None else {}
        with core_errors():
            return resolve_config(config_file=config_file, session=self.session, arguments=options)

    @magic_arguments()
    @argument("task", nargs="?", metavar="TASK",
              help="notebook variable holding the nexa_nb.Task (default: NexaMagics.default_task, 'task').")
    @config_flags
    @line_magic
    def nexa_train(self, line):
        """Train a nexa_nb.Task; returns the nexa_nb.TrainResult (also nexa_nb.last_result()).

        The plan (strategy, precision, processes, batch arithmetic) and every fallback note
        are printed first; then the live dashboard, or console lines with
        ``%config NexaMagics.dashboard = False``. Flags override the %nexa_config defaults,
        which override the environment and the config file. Bad input stops before any
        process starts, with one line naming the fix; if a worker fails, the error names
        its rank and ``%nexa_status --traceback`` shows its traceback.

        Examples::

            res = %nexa_train --zero 3 --bf16 --procs 2 --max-steps 100
            %nexa_train my_task --zero 2 --offload cpu --target-batch 64 --ckpt-dir ckpt
            %nexa_train --resume latest --ckpt-dir ckpt;
        """
        args = parse(self.nexa_train, line)
        task = self.task_named(args.task)
        self.last_error = None
        if self.dashboard:
            from nexa_nb.sinks.dashboard import Dashboard

            sink = Dashboard(refresh_interval=self.refresh_interval)
        else:
            from nexa_nb.sinks.console import ConsoleSink

            sink = PlanNotesShown(ConsoleSink())
        shown = False

        def show_plan(plan):
            """Once the task and the flags passed every check: the plan, then the live view."""
            nonlocal shown
            print(plan.describe())
            if self.dashboard:
                sink.show()
            shown = True

        try:
            return api.train(task, config=args.config or self.config_file, session=self.session,
                             sinks=[sink], on_plan=show_plan, **options_of(args))
        except ConfigError as exc:
            raise UsageError(one_line(exc)) from None
        except TrainingError as exc:
            message = one_line(exc)
            if exc.worker_traceback:  # kept for %nexa_status --traceback, not printed
                self.last_error = exc
                message += " (the worker's traceback: %nexa_status --traceback)"
            raise UsageError(message) from None
        finally:
            if shown and self.dashboard:
                sink.finalize()

    @magic_arguments()
    @argument("--reset", action="store_true", help="forget the defaults set so far (flags given with it apply "
                                                   "afterwards).")
    @argument("--save", metavar="FILE", help="write the resolved configuration as an accelerate config YAML, "
                                             "for accelerate launch --config_file FILE.")
    @argument("--widget", action="store_true", help="open the configuration form.")
    @config_flags
    @line_magic
    def nexa_config(self, line):
        """Set defaults that later %nexa_train, %nexa_plan and %nexa_export calls inherit.

        With flags, they are merged into the defaults (checked first: a bad combination
        changes nothing) and the resulting plan is printed. Without flags, the resolved
        configuration is shown as a table of field, value and source (default, session,
        env:NAME, a file, argument), followed by the plan and the DeepSpeed config when
        ZeRO is on. ``--save FILE`` writes the accelerate config YAML of what is resolved.

        Examples::

            %nexa_config --zero 2 --bf16 --grad-accum 4
            %nexa_config
            %nexa_config --save accelerate.yaml
            %nexa_config --reset
        """
        args = parse(self.nexa_config, line)
        if args.widget:
            from nexa_nb import widgets_form

            return widgets_form.show(self)
        session = {} if args.reset else dict(self.session)
        session.update(options_of(args))
        config_file = args.config or (None if args.reset else self.config_file)
        with core_errors():
            cfg = resolve_config(config_file=config_file, session=session)
            plan = make_plan(cfg)
        changed = args.reset or args.config is not None or bool(options_of(args))
        self.session, self.config_file = session, config_file
        if args.save:
            self.save(plan, args.save)
        elif changed:
            shown = ", ".join(f"{k}={v!r}" for k, v in session.items()) or "none"
            print(f"defaults: {shown}" + (f"; config file: {config_file}" if config_file else ""))
            print(plan.describe())
        else:
            rows = [(name, value, cfg.source_of(name)) for name, value in cfg.as_dict().items()]
            print(table(rows, ("field", "value", "source")))
            print()
            print(plan.describe())
            if plan.uses_deepspeed:
                print("DeepSpeed config:")
                print(plan.deepspeed_json())

    def save(self, plan, path: str) -> None:
        from nexa_nb import export
        try:
            export.save_accelerate_config(plan.config, path)
        except OSError as exc:
            raise UsageError(f"cannot write {path!r} ({exc.strerror or exc}). Fix: pass a file path in a "
                             "writable folder.") from None
        print(f"wrote {path}; run a script with it: accelerate launch --config_file {path} SCRIPT")
        if plan.uses_deepspeed and plan.device == "cpu" and plan.procs > 1:
            print("note: without a GPU, `accelerate test` fails on this file: its test script sets no gloo "
                  "backend for DeepSpeed, so each process believes it is alone (nexa_nb's engine sets it)")

    @magic_arguments()
    @argument("task", nargs="?", metavar="TASK",
              help="notebook variable holding the nexa_nb.Task whose model is counted (default: "
                   "NexaMagics.default_task). A model factory is built once, on the CPU.")
    @argument("--params", type=parse_count, metavar="N",
              help="total parameters instead of counting the task's model: 350M, 7B, 7e9.")
    @argument("--largest-layer", type=parse_count, metavar="N",
              help="parameters of the largest layer, with --params (default: the whole model, which "
                   "overstates ZeRO-3).")
    @argument("--gpus", type=positive(int), metavar="N",
              help="devices (default: the GPUs found; without GPUs, --procs).")
    @argument("--gpu-mem", type=positive(float), metavar="GB",
              help="memory of one device in GiB (default: the smallest GPU found; without GPUs, the host "
                   "memory available, shared by the processes).")
    @line_magic
    def nexa_plan(self, line):
        """Model-state memory per ZeRO stage and offload choice, and the setup to train with.

        One row per setup: plain Accelerate, ZeRO 0-3, and the cpu offloads, with the
        memory per device and on the host (DeepSpeed's own estimates). Then the fastest
        setup that fits, its flags for %nexa_train and the reason.

        Examples::

            %nexa_plan
            %nexa_plan --params 7B --gpus 8 --gpu-mem 80
        """
        args = parse(self.nexa_plan, line)
        if args.params is not None:
            total, largest = args.params, args.largest_layer or args.params
            counted = "given"
        else:
            model = self.task_named(args.task).build_model()
            total, largest = memory.count_params(model)
            counted = f"counted from {args.task or self.default_task}'s model"
        cfg = self.resolved()
        hw = probe()
        devices = args.gpus if args.gpus is not None else len(hw.gpus) or cfg.procs
        if args.gpu_mem is not None:
            device_bytes = int(args.gpu_mem * GiB)
            where = f"{memory.format_bytes(device_bytes)} each"
        elif hw.gpus:
            device_bytes = hw.device_memory_bytes
            where = f"{hw.gpus[0].name}, {memory.format_bytes(device_bytes)} each"
        else:
            device_bytes = hw.host_available_bytes // devices
            where = (f"no GPU: host memory is the device memory, {memory.format_bytes(hw.host_available_bytes)} "
                     f"available shared by {devices} process(es)")
        with core_errors(ValueError):
            rows = memory.memory_table(total, largest, gpus_per_node=devices)
            best = memory.recommend(total, largest, device_bytes_available=device_bytes,
                                    host_bytes_available=hw.host_available_bytes, gpus_per_node=devices,
                                    wanted_micro_batch=cfg.batch_size)
        print(f"model: {total:,} parameters, largest layer {largest:,} ({counted})")
        print(f"devices: {devices} ({where}); host: {memory.format_bytes(hw.host_available_bytes)} available")
        print(table([(setup_flags(r) or "plain Accelerate", memory.format_bytes(r.device_bytes),
                      memory.format_bytes(r.host_bytes)) for r in rows],
                    ("setup", "per device", "host")))
        print(f"recommended: {setup_flags(best) or 'plain Accelerate (no --zero)'}")
        print(f"reason: {best.reason}")

    @magic_arguments()
    @argument("--traceback", action="store_true",
              help="print the traceback of the worker that made the last %%nexa_train fail.")
    @line_magic
    def nexa_status(self, line):
        """What is available and what a run would use now.

        Devices and their memory; the plan the current defaults give (distributed type,
        precision, accumulation, processes); the versions of torch, accelerate, deepspeed,
        transformers and peft; the last run's outcome. ``--traceback`` prints only the
        failing worker's traceback from the last failed %nexa_train.
        """
        args = parse(self.nexa_status, line)
        if args.traceback:
            print(self.last_error.worker_traceback if self.last_error else "no worker has failed in this kernel")
            return
        hw = probe()
        gpus = ", ".join(f"{g.name} ({memory.format_bytes(g.memory_bytes)})" for g in hw.gpus)
        print(f"devices: {gpus or 'no GPU (CPU processes)'}; host: {hw.cpu_cores} cores, "
              f"{memory.format_bytes(hw.host_memory_bytes)} ({memory.format_bytes(hw.host_available_bytes)} available)")
        try:
            print(make_plan(self.resolved()).describe())
        except (UsageError, ConfigError) as exc:
            print(f"current defaults do not resolve: {exc}")
        print("versions: " + ", ".join(f"{name} {version(name)}" for name in VERSIONED))
        result = api.last_result()
        if result is not None:
            loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
            print(f"last run: {result.status}, {len(result.history)} steps, final loss {loss}, "
                  f"{result.distributed_type} x {result.num_processes}"
                  + (f", checkpoint {result.checkpoint_dir}" if result.checkpoint_dir else ""))
        if self.last_error is not None:
            print(f"last failure: {self.last_error} (%nexa_status --traceback)")

    @magic_arguments()
    @argument("script", metavar="SCRIPT", help="the Python script to write, e.g. train.py.")
    @argument("task", nargs="?", metavar="TASK",
              help="notebook variable holding the nexa_nb.Task (default: NexaMagics.default_task).")
    @config_flags
    @line_magic
    def nexa_export(self, line):
        """Write a script (and its accelerate config) that trains TASK outside the notebook.

        The configuration is resolved as for %nexa_train (defaults, then flags). Prints
        the files written, how the task travels to them, and the ``accelerate launch``
        command that runs them.

        Example::

            %nexa_export train.py --zero 3 --bf16 --procs 8
        """
        args = parse(self.nexa_export, line)
        task_var = args.task or self.default_task
        task = self.task_named(task_var)
        from nexa_nb import export
        cfg = self.resolved(args)
        with core_errors():
            files = export.export_script(task, cfg, args.script, task_var=task_var)
        print(files.explanation)  # the files written, how the task travels, and the command to run


def register(ipython) -> None:
    """Register the magics once per shell: loading the extension again keeps the defaults set."""
    if "NexaMagics" not in ipython.magics_manager.registry:
        ipython.register_magics(NexaMagics(ipython))
