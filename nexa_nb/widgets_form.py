"""The configuration form of ``%nexa_config --widget`` (ipywidgets 8: JupyterLab 4, Notebook 7).

One control per setting. Whenever one changes, `ConfigForm.refresh` resolves the settings
the way the flags are resolved (`resolve_config`, then `make_plan`) and shows the plan, the
model-state memory per device, the DeepSpeed JSON and the equivalent ``%nexa_train`` line.
A combination the core refuses shows its `ConfigError` in red, the very message
``%nexa_train`` gives for the same flags, and Train and "Apply as defaults" stay disabled
until it is fixed. The controls only observe: every decision is the core's.

The pure part (`form_values`, `options_from_form`, `magic_line`) needs no widget. Importing
this module imports no torch: the task's model is counted when the form first needs it.
"""

from __future__ import annotations

import shlex
from html import escape
from typing import Any, Callable, Mapping

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.display import HTML, display

from nexa_nb import api, memory
from nexa_nb.config import OFFLOAD_DEVICES, ConfigError, TrainConfig, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.magics import one_line, setup_flags
from nexa_nb.plan import Plan, make_plan
from nexa_nb.sinks.dashboard import Dashboard

FORM_FIELDS = ("zero", "offload_optimizer", "offload_param", "nvme_path", "precision", "batch_size",
               "grad_accum", "target_batch", "procs", "epochs", "max_steps", "lr", "lora", "lora_r",
               "lora_alpha", "grad_ckpt")
"""The `TrainConfig` fields the form sets, in the order of ``%nexa_train``'s flags."""

PRECISION_FLAGS = {"no": "--fp32", "fp16": "--fp16", "bf16": "--bf16"}
ERROR_COLOR = "var(--jp-error-color1, #d32f2f)"


# --- the pure part ---------------------------------------------------------------------------

def form_values(config: TrainConfig) -> dict[str, Any]:
    """The controls' values that show `config`: the inverse of `options_from_form`."""
    values = {name: getattr(config, name) for name in FORM_FIELDS}
    values["zero"] = "none" if config.zero is None else str(config.zero)
    for name in ("nvme_path", "target_batch", "max_steps"):
        values[name] = "" if values[name] is None else str(values[name])
    return values


def options_from_form(values: Mapping[str, Any]) -> dict[str, Any]:
    """The `TrainConfig` options that the controls' `values` stand for, one per form field.

    Empty text means None (no target batch, no step limit, no NVMe folder); text that is not
    a whole number is passed on as typed, for the core to refuse. With a target batch,
    grad_accum is left out: it is derived from the target, as with ``--target-batch`` alone.
    """
    options = {name: values[name] for name in FORM_FIELDS}
    options["zero"] = None if values["zero"] == "none" else int(values["zero"])
    options["nvme_path"] = values["nvme_path"].strip() or None
    for name in ("target_batch", "max_steps"):
        options[name] = _whole_number(values[name])
    if options["target_batch"] is not None:
        del options["grad_accum"]
    return options


def _whole_number(text: str) -> int | str | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def magic_line(options: Mapping[str, Any]) -> str:
    """The ``%nexa_train`` line for `options`: a flag for each value other than nexa_nb's default.

    LoRA's rank and alpha are left out while LoRA is off, where they change nothing.
    """
    words = ["%nexa_train"]
    for name in FORM_FIELDS:
        value = options.get(name, getattr(TrainConfig, name))
        if value == getattr(TrainConfig, name) or (name in ("lora_r", "lora_alpha") and not options.get("lora")):
            continue
        if name == "precision":
            words.append(PRECISION_FLAGS[value])
        elif value is True:
            words.append(_flag(name))
        else:
            words += [_flag(name), _word(value)]
    return " ".join(words)


def _word(value) -> str:
    """A flag's value as typed: quoted only when it holds a space, which could not be typed otherwise."""
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return shlex.quote(text) if any(char.isspace() for char in text) else text


def _flag(name: str) -> str:
    return "--offload" if name == "offload_optimizer" else "--" + name.replace("_", "-")


def memory_html(plan: Plan, counted: str) -> str:
    """The chosen setup's model-state memory, then every setup's, then the recommended one.

    `counted` says where the parameter count comes from, or why there is none.
    """
    if not plan.memory:
        return f"<i>unknown: {escape(counted)}</i>"
    c = plan.config
    chosen = memory.model_state_memory(plan.total_params, plan.largest_layer_params, stage=c.zero,
                                       offload_optimizer=c.offload_optimizer, offload_param=c.offload_param,
                                       gpus_per_node=c.procs)

    def label(setup) -> str:
        return setup_flags(setup) or "plain Accelerate"

    def weight(row) -> str:
        same = (row.stage, row.offload_optimizer, row.offload_param) == (c.zero, c.offload_optimizer, c.offload_param)
        return "bold" if same else "normal"

    rows = "".join(
        f'<tr style="font-weight:{weight(row)}"><td>{label(row)}</td>'
        f"<td>{memory.format_bytes(row.device_bytes)}</td><td>{memory.format_bytes(row.host_bytes)}</td></tr>"
        for row in plan.memory)
    best = plan.recommendation
    return (f"<div><b>{memory.format_bytes(chosen.device_bytes)} per device</b>, "
            f"{memory.format_bytes(chosen.host_bytes)} on the host for {label(chosen)} "
            f"(parameters, gradients and optimizer state; activations not included)</div>"
            f"<div>model: {plan.total_params:,} parameters, largest layer {plan.largest_layer_params:,} "
            f"({escape(counted)})</div>"
            f"<table><tr><th>setup</th><th>per device</th><th>host</th></tr>{rows}</table>"
            f"<div>recommended: {setup_flags(best) or 'plain Accelerate (no --zero)'}. {escape(best.reason)}</div>")


def _pre(text: str) -> str:
    return f'<pre style="margin:0;max-height:24em;overflow:auto">{escape(text)}</pre>'


def _error_html(exc: BaseException) -> str:
    return f'<div style="color:{ERROR_COLOR}">{escape(one_line(exc))}</div>'


# --- the form --------------------------------------------------------------------------------

def _controls() -> dict[str, widgets.Widget]:
    def labelled(kind, description: str, **kwargs):
        return kind(description=description, style={"description_width": "10em"}, layout={"width": "20em"},
                    **kwargs)

    def checkbox(description: str):
        return widgets.Checkbox(description=description, indent=False)

    return {
        "zero": labelled(widgets.Dropdown, "ZeRO stage", options=("none", "0", "1", "2", "3")),
        "offload_optimizer": labelled(widgets.Dropdown, "optimizer offload", options=OFFLOAD_DEVICES),
        "offload_param": labelled(widgets.Dropdown, "parameter offload", options=OFFLOAD_DEVICES),
        "nvme_path": labelled(widgets.Text, "NVMe folder", placeholder="for nvme offload"),
        "precision": labelled(widgets.Dropdown, "precision", options=(("fp32", "no"), ("fp16", "fp16"),
                                                                      ("bf16", "bf16"))),
        "batch_size": labelled(widgets.IntText, "micro-batch"),
        "grad_accum": labelled(widgets.IntText, "grad accumulation"),
        "target_batch": labelled(widgets.Text, "target batch", placeholder="none"),
        "procs": labelled(widgets.IntText, "processes"),
        "max_steps": labelled(widgets.Text, "max steps", placeholder="none: train the epochs"),
        "epochs": labelled(widgets.IntText, "epochs"),
        "lr": labelled(widgets.FloatText, "learning rate"),
        "lora": checkbox("LoRA"),
        "lora_r": labelled(widgets.IntText, "LoRA r"),
        "lora_alpha": labelled(widgets.IntText, "LoRA alpha"),
        "grad_ckpt": checkbox("gradient checkpointing"),
    }


GROUPS = (
    ("DeepSpeed ZeRO", ("zero", "offload_optimizer", "offload_param", "nvme_path")),
    ("precision and batch", ("precision", "batch_size", "grad_accum", "target_batch", "procs")),
    ("schedule and model", ("max_steps", "epochs", "lr", "lora", "lora_r", "lora_alpha", "grad_ckpt")),
)


class ConfigForm:
    """The form: a control per field of `FORM_FIELDS`, and what the settings resolve to.

    `defaults` holds what the settings layer over and what "Apply as defaults" replaces:
    ``.session`` (a dict of `TrainConfig` fields) and ``.config_file``; in a notebook it is
    the `NexaMagics`. `find_task` returns the `nexa_nb.Task` that Train runs and whose model
    is counted, or raises UsageError saying why there is none.

    The widgets are attributes: `controls` (field name -> control), the HTML views
    `error_view`, `plan_view`, `memory_view`, `deepspeed_view` and `status_view`, the
    text field `magic_view`, `train_button`, `apply_button`, the `output` area where
    training shows, and `widget`, the box that holds them all. `plan` is the resolved plan,
    or None while `error` holds the ConfigError that refuses the settings.
    """

    def __init__(self, defaults, find_task: Callable[[], Any], *, refresh_interval: float = 0.25):
        self.defaults = defaults
        self.find_task = find_task
        self.refresh_interval = refresh_interval
        """Seconds between redraws of the dashboard that Train shows."""
        self.plan: Plan | None = None
        self.error: ConfigError | None = None
        self._counted: tuple[Any, tuple[tuple[int, int] | None, str]] | None = None  # (task, its count)

        self.controls = _controls()
        for name, value in form_values(self._starting_config()).items():
            self.controls[name].value = value
        self.error_view = widgets.HTML()
        self.magic_view = widgets.Text(description="copy as magic", style={"description_width": "10em"},
                                       layout={"width": "100%"})
        self.train_button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.apply_button = widgets.Button(description="Apply as defaults",
                                           tooltip="later %nexa_train runs inherit these settings")
        self.status_view = widgets.HTML()
        self.plan_view = widgets.HTML()
        self.memory_view = widgets.HTML()
        self.deepspeed_view = widgets.HTML()
        self.output = widgets.Output()
        columns = [widgets.VBox([widgets.HTML(f"<b>{title}</b>"), *(self.controls[name] for name in names)])
                   for title, names in GROUPS]
        self.widget = widgets.VBox([
            widgets.HBox(columns),
            self.error_view,
            self.magic_view,
            widgets.HBox([self.train_button, self.apply_button, self.status_view]),
            widgets.HTML("<b>plan</b>"), self.plan_view,
            widgets.HTML("<b>model-state memory</b>"), self.memory_view,
            widgets.HTML("<b>DeepSpeed config</b>"), self.deepspeed_view,
            self.output,
        ])

        for control in self.controls.values():
            control.observe(self.refresh, names="value")
        self.magic_view.observe(self._keep_magic_line, names="value")
        self.train_button.on_click(self.train)
        self.apply_button.on_click(self.apply)
        self.refresh()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _starting_config(self) -> TrainConfig:
        """What a run would use now; nexa_nb's defaults when the session defaults do not resolve
        (the form then shows why, if its settings do not override the culprit)."""
        try:
            return resolve_config(config_file=self.defaults.config_file, session=self.defaults.session)
        except ConfigError:
            return TrainConfig()

    def options(self) -> dict[str, Any]:
        """The current settings as `TrainConfig` options."""
        return options_from_form({name: control.value for name, control in self.controls.items()})

    # --- observers -------------------------------------------------------------------------

    def refresh(self, change=None) -> None:
        """Resolve the current settings and show what they give, or why they are refused."""
        options = self.options()
        self.magic_view.value = magic_line(options)
        self.status_view.value = ""
        try:
            config = resolve_config(config_file=self.defaults.config_file, session=self.defaults.session,
                                    arguments=options)
            counts, counted = self._param_counts()
            total, largest = counts or (None, None)
            self.plan, self.error = make_plan(config, total_params=total, largest_layer_params=largest), None
        except ConfigError as exc:
            self.plan, self.error = None, exc
        self.train_button.disabled = self.apply_button.disabled = self.plan is None
        if self.plan is None:
            self.error_view.value = _error_html(self.error)
            self.plan_view.value = "<i>nothing to run until the error above is fixed</i>"
            self.memory_view.value = self.deepspeed_view.value = ""
            return
        self.error_view.value = ""
        self.plan_view.value = _pre(self.plan.describe())
        self.memory_view.value = memory_html(self.plan, counted)
        self.deepspeed_view.value = (_pre(self.plan.deepspeed_json()) if self.plan.uses_deepspeed
                                     else "<i>none: ZeRO is off, Accelerate trains without DeepSpeed</i>")

    def _keep_magic_line(self, change) -> None:
        """The line is there to be copied: an edit is undone."""
        line = magic_line(self.options())
        if change["new"] != line:
            self.magic_view.value = line

    def _param_counts(self) -> tuple[tuple[int, int] | None, str]:
        """(total, largest layer) parameters of the task's model and where they come from, or
        None and why not. Counted once per task: a model factory is built once, on the CPU."""
        try:
            task = self.find_task()
        except UsageError as exc:
            return None, one_line(exc)
        if self._counted is None or self._counted[0] is not task:
            self._counted = task, _count(task)
        return self._counted[1]

    # --- buttons ---------------------------------------------------------------------------

    def train(self, button=None) -> None:
        """Train the task with the current settings, its live dashboard under the form.

        Runs on the kernel's main thread, where button callbacks run, and holds it until the
        run ends, as ``%nexa_train`` does; the dashboard then becomes its static picture.
        """
        if self.plan is None:
            return
        self.train_button.disabled = True
        self.output.clear_output()
        try:
            with self.output:
                self._run()
        finally:
            self.refresh()

    def _run(self) -> None:
        dashboard = Dashboard(refresh_interval=self.refresh_interval)
        shown = False

        def show_dashboard(plan: Plan) -> None:
            """Once the task and the settings passed every check, as in %nexa_train."""
            nonlocal shown
            display(dashboard.widget)
            shown = True

        failure = None
        try:
            api.train(self.find_task(), config=self.defaults.config_file, session=self.defaults.session,
                      sinks=[dashboard], on_plan=show_dashboard, **self.options())
        except (UsageError, ConfigError, TrainingError) as exc:
            failure = exc
        finally:
            if shown:
                # Dashboard.show would swap the live widget for the picture in place, through a
                # display id, but an Output widget ignores display updates: clear, then finalize.
                self.output.clear_output()
                dashboard.finalize()
        if failure is not None:
            worker = getattr(failure, "worker_traceback", "")
            display(HTML(_error_html(failure) + (f"<details><summary>the worker's traceback</summary>"
                                                 f"{_pre(worker)}</details>" if worker else "")))

    def apply(self, button=None) -> None:
        """Make the settings the session defaults, which later ``%nexa_train`` runs inherit.

        The form's fields replace their session values and the other session values stay, as
        after ``%nexa_config`` given a flag for every setting of the form.
        """
        if self.plan is None:
            return
        kept = {name: value for name, value in self.defaults.session.items() if name not in FORM_FIELDS}
        self.defaults.session = {**kept, **self.options()}
        self.status_view.value = "defaults set: later %nexa_train runs inherit these settings"


def _count(task) -> tuple[tuple[int, int] | None, str]:
    try:
        model = task.build_model()
    except Exception as exc:  # the user's factory: whatever it raises is only a reason to show
        return None, f"building the task's model failed ({type(exc).__name__}: {one_line(exc)})"
    counts = memory.count_params(model)
    if counts[0] == 0:
        return None, "the task's model has no parameters"
    return counts, "counted from the task's model"


def show(magics) -> None:
    """``%nexa_config --widget``: display the form over the session defaults of `magics`."""
    display(ConfigForm(magics, lambda: magics.task_named(None), refresh_interval=magics.refresh_interval))
