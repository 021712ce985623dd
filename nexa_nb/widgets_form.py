"""The configuration form of ``%nexa_config --widget`` (ipywidgets 8: JupyterLab 4, Notebook 7).

One control per setting, made from the settings' declarations (`nexa_nb.settings`: each
field's label, type and choices), one column per group of flags. Whenever one changes,
`ConfigForm.refresh` resolves the settings the way the flags are resolved
(`resolve_config`, then `make_plan`) and shows the plan, the model-state memory per device,
the DeepSpeed JSON and the equivalent ``%nexa_train`` line. A combination the core refuses
shows its `ConfigError` in red, the very message ``%nexa_train`` gives for the same flags,
and Train and "Apply as defaults" stay disabled until it is fixed. The controls only
observe: every decision is the core's.

The pure part (`form_values`, `options_from_form`, `magic_line`) needs no widget. Importing
this module imports no torch: the task's model is counted when the form first needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from html import escape
from typing import Any

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.display import HTML, display

from nexa_nb import flags, memory, text
from nexa_nb.config import ConfigError, TrainConfig, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan, make_plan
from nexa_nb.session import Session
from nexa_nb.settings import FIELDS, Field, by_group

FORM_FIELDS = tuple(f.name for group in by_group().values() for f in group if f.meta.label is not None)
"""The `TrainConfig` fields the form sets, in the order of ``%nexa_train``'s flags."""

ERROR_COLOR = "var(--jp-error-color1, #d32f2f)"


# --- the pure part ---------------------------------------------------------------------------


def _is_dropdown(f: Field) -> bool:
    return f.meta.choices is not None and f.kind is not tuple


def _is_text(f: Field) -> bool:
    """Text for what a number box cannot hold: None ("none"), "auto", paths, lists of names."""
    return not _is_dropdown(f) and (f.optional or bool(f.meta.auto) or f.kind in (str, tuple))


def _text_of(value) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def form_values(config: TrainConfig) -> dict[str, Any]:
    """The controls' values that show `config`: the inverse of `options_from_form`."""
    values = {}
    for name in FORM_FIELDS:
        f, value = FIELDS[name], getattr(config, name)
        if _is_dropdown(f) and f.kind is int:
            values[name] = "none" if value is None else str(value)
        elif _is_text(f):
            values[name] = _text_of(value)
        else:
            values[name] = value
    return values


def options_from_form(values: Mapping[str, Any]) -> dict[str, Any]:
    """The `TrainConfig` options that the controls' `values` stand for, one per form field.

    Text reads as the flag reads it (empty text is None, ``a,b`` a list of names); text that
    does not read is passed on as typed, for the core to refuse. With a target batch,
    grad_accum is left out: it is derived from the target, as with ``--target-batch`` alone.
    """
    options = {}
    for name in FORM_FIELDS:
        f, value = FIELDS[name], values[name]
        numeric_choice = _is_dropdown(f) and f.kind is int
        options[name] = flags.parse_text(name, value) if _is_text(f) or numeric_choice else value
    if options["target_batch"] is not None:
        del options["grad_accum"]
    return options


def magic_line(options: Mapping[str, Any]) -> str:
    """The ``%nexa_train`` line for `options`: a flag for each value other than nexa_nb's default.

    The LoRA settings are left out while LoRA is off, where they change nothing.
    """
    lora_off = not options.get("lora")
    return flags.magic_line(
        {name: value for name, value in options.items() if not (lora_off and FIELDS[name].meta.group == "LoRA")}
    )


def memory_html(plan: Plan, counted: str) -> str:
    """The chosen setup's model-state memory, then every setup's, then the recommended one.

    `counted` says where the parameter count comes from, or why there is none.
    """
    if not plan.memory:
        return f"<i>unknown: {escape(counted)}</i>"
    c = plan.config
    chosen = memory.model_state_memory(
        plan.total_params,
        plan.largest_layer_params,
        stage=c.zero,
        offload_optimizer=c.offload_optimizer,
        offload_param=c.offload_param,
        gpus_per_node=c.procs,
    )

    def label(setup) -> str:
        return text.setup_flags(setup.stage, setup.offload_optimizer, setup.offload_param) or "plain Accelerate"

    def weight(row) -> str:
        same = (row.stage, row.offload_optimizer, row.offload_param) == (c.zero, c.offload_optimizer, c.offload_param)
        return "bold" if same else "normal"

    rows = "".join(
        f'<tr style="font-weight:{weight(row)}"><td>{label(row)}</td>'
        f"<td>{text.format_bytes(row.device_bytes)}</td><td>{text.format_bytes(row.host_bytes)}</td></tr>"
        for row in plan.memory
    )
    best = plan.recommendation
    return (
        f"<div><b>{text.format_bytes(chosen.device_bytes)} per device</b>, "
        f"{text.format_bytes(chosen.host_bytes)} on the host for {label(chosen)} "
        f"(parameters, gradients and optimizer state; activations not included)</div>"
        f"<div>model: {plan.total_params:,} parameters, largest layer {plan.largest_layer_params:,} "
        f"({escape(counted)})</div>"
        f"<table><tr><th>setup</th><th>per device</th><th>host</th></tr>{rows}</table>"
        f"<div>recommended: {label(best) if best.stage is not None else 'plain Accelerate (no --zero)'}. "
        f"{escape(best.reason)}</div>"
    )


def _pre(text: str) -> str:
    return f'<pre style="margin:0;max-height:24em;overflow:auto">{escape(text)}</pre>'


def _error_html(exc: BaseException) -> str:
    return f'<div style="color:{ERROR_COLOR}">{escape(text.one_line(exc))}</div>'


# --- the form --------------------------------------------------------------------------------


def _control(f: Field) -> widgets.Widget:
    """The control a field's declaration asks for: checkbox, dropdown, number box or text."""
    if f.kind is bool:
        return widgets.Checkbox(description=f.meta.label, indent=False)
    common = dict(description=f.meta.label, style={"description_width": "10em"}, layout={"width": "20em"})
    if _is_dropdown(f):
        if f.kind is int:
            choices = ("none", "0", "1", "2", "3") if f.optional else tuple(map(str, f.meta.choices))
        else:
            choices = tuple((text.precision_label(c), c) if f.name == "precision" else c for c in f.meta.choices)
        return widgets.Dropdown(options=choices, **common)
    if _is_text(f):
        return widgets.Text(placeholder=f.meta.placeholder, **common)
    return (widgets.IntText if f.kind is int else widgets.FloatText)(**common)


def _controls() -> dict[str, widgets.Widget]:
    return {name: _control(FIELDS[name]) for name in FORM_FIELDS}


class ConfigForm:
    """The form: a control per field of `FORM_FIELDS`, and what the settings resolve to.

    `session` holds what the settings layer over and what "Apply as defaults" replaces:
    its ``defaults`` (a dict of `TrainConfig` fields) and ``config_file``. `find_task`
    returns the `nexa_nb.Task` that Train runs and whose model is counted, or raises
    UsageError saying why there is none.

    The widgets are attributes: `controls` (field name -> control), the HTML views
    `error_view`, `plan_view`, `memory_view`, `deepspeed_view` and `status_view`, the
    text field `magic_view`, `train_button`, `apply_button`, the `output` area where
    training shows, and `widget`, the box that holds them all. `plan` is the resolved plan,
    or None while `error` holds the ConfigError that refuses the settings.
    """

    def __init__(self, session: Session, find_task: Callable[[], Any], *, refresh_interval: float = 0.25):
        self.session = session
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
        self.magic_view = widgets.Text(
            description="copy as magic", style={"description_width": "10em"}, layout={"width": "98%"}
        )
        self.train_button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.apply_button = widgets.Button(
            description="Apply as defaults", tooltip="later %nexa_train runs inherit these settings"
        )
        self.status_view = widgets.HTML()
        self.plan_view = widgets.HTML()
        self.memory_view = widgets.HTML()
        self.deepspeed_view = widgets.HTML()
        self.output = widgets.Output()
        columns = [
            widgets.VBox(
                [
                    widgets.HTML(f"<b>{group}</b>"),
                    *(self.controls[f.name] for f in group_fields if f.name in self.controls),
                ]
            )
            for group, group_fields in by_group().items()
        ]
        self.widget = widgets.VBox(
            [
                widgets.GridBox(columns, layout={"grid_template_columns": "repeat(auto-fill, minmax(21em, 1fr))"}),
                self.error_view,
                self.magic_view,
                widgets.HBox([self.train_button, self.apply_button, self.status_view]),
                widgets.HTML("<b>plan</b>"),
                self.plan_view,
                widgets.HTML("<b>model-state memory</b>"),
                self.memory_view,
                widgets.HTML("<b>DeepSpeed config</b>"),
                self.deepspeed_view,
                self.output,
            ]
        )

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
            return self.session.resolve()
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
            config = resolve_config(
                config_file=self.session.config_file, session=self.session.defaults, arguments=options
            )
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
        self.deepspeed_view.value = (
            _pre(self.plan.deepspeed_json())
            if self.plan.uses_deepspeed
            else "<i>none: ZeRO is off, Accelerate trains without DeepSpeed</i>"
        )

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
            return None, text.one_line(exc)
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
        failure = None
        try:
            with self.output:
                try:
                    self.session.train_in_cell(
                        self.find_task(),
                        self.options(),
                        output=self.output,
                        refresh_interval=self.refresh_interval,
                        print_plan=False,
                    )
                except (UsageError, ConfigError, TrainingError) as exc:
                    failure = exc
                if failure is not None:
                    worker = getattr(failure, "worker_traceback", "")
                    display(
                        HTML(
                            _error_html(failure)
                            + (
                                f"<details><summary>the worker's traceback</summary>{_pre(worker)}</details>"
                                if worker
                                else ""
                            )
                        )
                    )
        finally:
            self.refresh()

    def apply(self, button=None) -> None:
        """Make the settings the session defaults, which later ``%nexa_train`` runs inherit.

        The form's fields replace their session values and the other session values stay, as
        after ``%nexa_config`` given a flag for every setting of the form.
        """
        if self.plan is None:
            return
        kept = {name: value for name, value in self.session.defaults.items() if name not in FORM_FIELDS}
        self.session.defaults = {**kept, **self.options()}
        self.status_view.value = "defaults set: later %nexa_train runs inherit these settings"


def _count(task) -> tuple[tuple[int, int] | None, str]:
    try:
        model = task.build_model()
    except Exception as exc:  # the user's factory: whatever it raises is only a reason to show
        return None, f"building the task's model failed ({type(exc).__name__}: {text.one_line(exc)})"
    counts = memory.count_params(model)
    if counts[0] == 0:
        return None, "the task's model has no parameters"
    return counts, "counted from the task's model"


def show(session: Session, find_task: Callable[[], Any], *, refresh_interval: float = 0.25) -> None:
    """``%nexa_config --widget``: display the form over the defaults of `session`."""
    display(ConfigForm(session, find_task, refresh_interval=refresh_interval))
