"""The ``%nexa_*`` magics: a router from each line to one command in `nexa_nb.commands`.

    %nexa_train   [TASK] [flags]      train a nexa_nb.Task, return its TrainResult
    %nexa_config  [flags]             set defaults for later runs, or show the resolved config
    %nexa_plan    [TASK] [--params N] memory per ZeRO stage and offload, and a recommendation
    %nexa_status  [--traceback]       devices, versions, the current setup and the last run
    %nexa_export  SCRIPT [TASK]       write a script for ``accelerate launch``
    %nexa_runs    [--compare RUN ...] the recorded runs, or their loss curves on one picture
    %nexa_attach  RUN                 draw a run from its record, live until it ends
    %nexa_stop    RUN                 stop a detached run, keeping its last checkpoint

Flags are the Python API's keywords with dashes (``--grad-accum 4`` is ``grad_accum=4``),
made from the settings' declarations (`nexa_nb.flags`); only the flags typed reach the core
as arguments, so the others fall through to the ``%nexa_config`` defaults, the environment
and the config file (see `nexa_nb.config`). ``-h`` / ``--help`` prints what ``%magic?`` shows.
Persistent options: ``%config NexaMagics.default_task = "my_task"`` (also ``dashboard`` and
``refresh_interval``).

Loading the magics imports neither torch nor DeepSpeed; they load when a run starts.
"""

from __future__ import annotations

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Unicode

from nexa_nb.commands import config, export, plan, runs, status, train
from nexa_nb.flags import config_flags, parse
from nexa_nb.session import Session, find_task
from nexa_nb.task import Task


@magics_class
class NexaMagics(Magics):
    """Train, plan and configure nexa_nb runs from a notebook (``%load_ext nexa_nb``)."""

    default_task = Unicode(
        "task",
        help="Name of the notebook variable holding the nexa_nb.Task that "
        "%nexa_train, %nexa_plan and %nexa_export use when no TASK is given.",
    ).tag(config=True)
    refresh_interval = Float(0.25, help="Seconds between redraws of the live dashboard.").tag(config=True)
    dashboard = Bool(True, help="Show the live dashboard during %nexa_train; False prints console lines instead.").tag(
        config=True
    )

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.session = Session()
        """What %nexa_config set, and the last run's result and failure."""

    def task_named(self, name: str | None) -> Task:
        return find_task(self.shell.user_ns, name or self.default_task)

    @magic_arguments()
    @argument(
        "task",
        nargs="?",
        metavar="TASK",
        help="notebook variable holding the nexa_nb.Task (default: NexaMagics.default_task, 'task').",
    )
    @config_flags
    @line_magic
    def nexa_train(self, line):
        """Train a nexa_nb.Task; returns the nexa_nb.TrainResult (also nexa_nb.last_result()).

        The plan (strategy, precision, processes, batch arithmetic) and every fallback note
        are printed first; then the live dashboard, or console lines with
        ``%config NexaMagics.dashboard = False``. Flags override the %nexa_config defaults,
        which override the environment and the config file. Bad input stops before any
        process starts, with one line naming the fix; if a worker fails, the error names
        its rank and ``%nexa_status --traceback`` shows its traceback. Every run writes a
        record (%nexa_runs, %nexa_attach); with ``--detach`` or ``--slurm`` the run trains
        outside the kernel and the cell returns a nexa_nb.DetachedRun at once.

        Examples::

            res = %nexa_train --zero 3 --bf16 --procs 2 --max-steps 100
            %nexa_train my_task --zero 2 --offload cpu --target-batch 64 --ckpt-dir ckpt
            %nexa_train --resume latest --ckpt-dir ckpt;
            handle = %nexa_train --detach --procs 2 --max-steps 1000 --ckpt-dir ckpt
            handle = %nexa_train --slurm partition=debug,cpus_per_task=2,time=30 --procs 2
        """
        args = parse(self.nexa_train, line)
        if args is not None:
            return train.run(
                self.session,
                self.task_named(args.task),
                args,
                dashboard=self.dashboard,
                refresh_interval=self.refresh_interval,
            )

    @magic_arguments()
    @argument(
        "--reset", action="store_true", help="forget the defaults set so far (flags given with it apply afterwards)."
    )
    @argument(
        "--save",
        metavar="FILE",
        help="write the resolved configuration as an accelerate config YAML, for accelerate launch --config_file FILE.",
    )
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
        if args is not None and args.widget:
            from nexa_nb import widgets_form

            return widgets_form.show(
                self.session, lambda: self.task_named(None), refresh_interval=self.refresh_interval
            )
        if args is not None:
            config.run(self.session, args)

    @magic_arguments()
    @argument(
        "task",
        nargs="?",
        metavar="TASK",
        help="notebook variable holding the nexa_nb.Task whose model is counted (default: "
        "NexaMagics.default_task). A model factory is built once, on the CPU.",
    )
    @argument(
        "--params",
        type=plan.parse_count,
        metavar="N",
        help="total parameters instead of counting the task's model: 350M, 7B, 7e9.",
    )
    @argument(
        "--largest-layer",
        type=plan.parse_count,
        metavar="N",
        help="parameters of the largest layer, with --params (default: the whole model, which overstates ZeRO-3).",
    )
    @argument(
        "--gpus", type=plan.positive(int), metavar="N", help="devices (default: the GPUs found; without GPUs, --procs)."
    )
    @argument(
        "--gpu-mem",
        type=plan.positive(float),
        metavar="GB",
        help="memory of one device in GiB (default: the smallest GPU found; without GPUs, the host "
        "memory available, shared by the processes).",
    )
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
        if args is None:
            return
        if args.params is not None:
            return plan.run(self.session, args)
        task = self.task_named(args.task)
        plan.run(self.session, args, task=task, counted=f"counted from {args.task or self.default_task}'s model")

    @magic_arguments()
    @argument(
        "--traceback",
        action="store_true",
        help="print the traceback of the worker that made the last %%nexa_train fail.",
    )
    @line_magic
    def nexa_status(self, line):
        """What is available and what a run would use now.

        Devices and their memory; the plan the current defaults give (distributed type,
        precision, accumulation, processes); the versions of torch, accelerate, deepspeed,
        transformers and peft; the last run's outcome. ``--traceback`` prints only the
        failing worker's traceback from the last failed %nexa_train.
        """
        args = parse(self.nexa_status, line)
        if args is not None:
            status.run(self.session, args)

    @magic_arguments()
    @argument("script", metavar="SCRIPT", help="the Python script to write, e.g. train.py.")
    @argument(
        "task",
        nargs="?",
        metavar="TASK",
        help="notebook variable holding the nexa_nb.Task (default: NexaMagics.default_task).",
    )
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
        if args is not None:
            task_var = args.task or self.default_task
            export.run(self.session, self.task_named(task_var), task_var, args)

    @magic_arguments()
    @argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="draw these runs' loss curves (and eval losses) on one picture instead of the table.",
    )
    @argument("--root", default="nexa_runs", metavar="DIR", help="the folder holding the runs (default: nexa_runs).")
    @line_magic
    def nexa_runs(self, line):
        """The runs recorded on disk: name, status, step / total, last loss, started, where it runs.

        Every run writes a record (``--run-dir``, default ``nexa_runs/TASK-time``); this lists
        them whichever kernel ran them. ``--compare A B ...`` draws their losses on one chart.

        Examples::

            %nexa_runs
            %nexa_runs --compare regression-20261130-120000 regression-20261130-120512
        """
        args = parse(self.nexa_runs, line)
        if args is not None:
            runs.table(args)

    @magic_arguments()
    @argument("run", metavar="RUN", help="the run's name in %%nexa_runs, or the path of its record.")
    @argument("--root", default="nexa_runs", metavar="DIR", help="the folder holding the runs (default: nexa_runs).")
    @line_magic
    def nexa_attach(self, line):
        """Draw a run from its record and follow it live until it ends; returns its TrainResult.

        Works from another notebook and after a kernel restart. A finished run gets the same
        static picture the cell that ran it left; an interrupt stops following, not the run.

        Example::

            res = %nexa_attach regression-20261130-120000
        """
        args = parse(self.nexa_attach, line)
        if args is not None:
            return runs.follow(args, dashboard=self.dashboard, refresh_interval=self.refresh_interval)

    @magic_arguments()
    @argument("run", metavar="RUN", help="the detached run's name in %%nexa_runs, or the path of its record.")
    @argument("--root", default="nexa_runs", metavar="DIR", help="the folder holding the runs (default: nexa_runs).")
    @line_magic
    def nexa_stop(self, line):
        """Stop a detached run or Slurm job (``%nexa_train --detach`` / ``--slurm``) as Ctrl-C stops
        a cell's: its workers stop and its last complete checkpoint is kept (``--resume`` it); a job
        still waiting in the queue is cancelled. Refused for a run that has ended, one that runs in
        a kernel, and one whose record this user cannot write.

        Example::

            %nexa_stop regression-20261130-120000
        """
        args = parse(self.nexa_stop, line)
        if args is not None:
            runs.stop(args)


def register(ipython) -> None:
    """Register the magics once per shell: loading the extension again keeps the defaults set."""
    if "NexaMagics" not in ipython.magics_manager.registry:
        ipython.register_magics(NexaMagics(ipython))
