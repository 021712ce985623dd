"""The configuration form (`%nexa_config --widget`) with real ipywidgets objects and no browser."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import ipywidgets as widgets
import pytest
import torch
from IPython.core.error import UsageError
from IPython.display import display
from IPython.utils.capture import capture_output

import nexa_nb
from nexa_nb import api, widgets_form
from nexa_nb.config import TrainConfig, resolve_config
from nexa_nb.flags import options_of, parse
from nexa_nb.hardware import Hardware
from nexa_nb.memory import format_bytes, model_state_memory
from nexa_nb.plan import make_plan
from nexa_nb.session import Session
from nexa_nb.widgets_form import ConfigForm, form_values, magic_line, options_from_form

GiB = 2**30
CPU_HOST = Hardware(cpu_cores=2, host_memory_bytes=16 * GiB, host_available_bytes=12 * GiB)
CONFIG_ENV = (
    "ACCELERATE_MIXED_PRECISION",
    "GRADIENT_ACCUMULATION_STEPS",
    "FORCE_CPU",
    "USE_DEEPSPEED",
    "DEEPSPEED_ZERO_STAGE",
    "DEEPSPEED_OFFLOAD_OPTIMIZER",
    "DEEPSPEED_OFFLOAD_PARAM",
    "ACCELERATE_GRADIENT_CHECKPOINTING",
    "SEED",
)


def tiny_task() -> nexa_nb.Task:
    """A Linear(4, 1): 5 parameters, all in one layer."""
    return nexa_nb.Task(
        lambda: torch.nn.Linear(4, 1),
        list(zip(torch.randn(64, 4), torch.randn(64, 1))),
        loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[-1]),
    )


@pytest.fixture(autouse=True)
def cpu_host(monkeypatch):
    """No configuration from the environment, and a 2-core host without a GPU wherever this runs."""
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("nexa_nb.plan.probe", lambda: CPU_HOST)


@pytest.fixture
def magics(shell, monkeypatch):
    """The shell's NexaMagics without defaults and without a task."""
    magics = shell.magics_manager.registry["NexaMagics"]
    monkeypatch.setattr(magics, "session", Session())
    monkeypatch.setattr(magics, "default_task", "task_for_the_form")
    monkeypatch.setattr(magics, "dashboard", False)
    return magics


@pytest.fixture
def form() -> ConfigForm:
    task = tiny_task()
    return ConfigForm(Session(), lambda: task)


def set_controls(form: ConfigForm, **values) -> None:
    for name, value in values.items():
        form.controls[name].value = value


def text(view) -> str:
    """What an HTML view shows, without its tags."""
    return html.unescape(re.sub(r"<[^>]+>", "", view.value))


def flags_error(shell, flags: str) -> str:
    """The one line that ``%nexa_train`` answers `flags` with."""
    shell.user_ns["form_task"] = tiny_task()
    try:
        with pytest.raises(UsageError) as info:
            shell.run_line_magic("nexa_train", f"form_task {flags}")
    finally:
        del shell.user_ns["form_task"]
    return str(info.value)


# --- the pure part ---------------------------------------------------------------------------


def test_options_and_magic_line_spell_the_flags_of_nexa_train(magics):
    values = form_values(TrainConfig())
    values.update(
        zero="3",
        offload_optimizer="nvme",
        offload_param="cpu",
        nvme_path="~/nvme",
        precision="bf16",
        batch_size="4",
        grad_accum=2,
        procs=2,
        epochs=3,
        max_steps="50",
        lr=3e-4,
        lora=True,
        lora_r=4,
        lora_alpha=8,
        grad_ckpt=True,
    )
    options = options_from_form(values)
    line = magic_line(options)
    assert line == (
        "%nexa_train --zero 3 --offload nvme --offload-param cpu --nvme-path ~/nvme --bf16 "
        "--batch-size 4 --grad-accum 2 --procs 2 --epochs 3 --max-steps 50 --lr 0.0003 --lora "
        "--lora-r 4 --lora-alpha 8 --grad-ckpt"
    )
    typed = options_of(parse(magics.nexa_train, line.removeprefix("%nexa_train ")))
    defaults = TrainConfig()
    assert typed == {
        name: value
        for name, value in options.items()  # the form's settings other than defaults
        if value is not None and value != getattr(defaults, name)
    }


def test_empty_text_is_none_and_a_target_batch_leaves_the_accumulation_to_the_core():
    values = form_values(TrainConfig())
    assert values["zero"] == "none" and values["target_batch"] == values["max_steps"] == values["nvme_path"] == ""
    options = options_from_form(values)
    assert options["zero"] is options["target_batch"] is options["max_steps"] is options["nvme_path"] is None
    assert magic_line(options) == "%nexa_train"

    options = options_from_form({**values, "target_batch": "32", "grad_accum": 3})
    assert options["target_batch"] == 32 and "grad_accum" not in options
    assert magic_line(options) == "%nexa_train --target-batch 32"
    assert magic_line(options_from_form({**values, "lora_r": 4})) == "%nexa_train"  # r means nothing without LoRA


# --- what the form shows -----------------------------------------------------------------------


def test_starts_from_the_session_defaults():
    defaults = Session(defaults={"zero": 2, "precision": "bf16", "grad_accum": 4})
    form = ConfigForm(defaults, tiny_task)
    assert form.controls["zero"].value == "2" and form.controls["precision"].value == "bf16"
    assert form.controls["grad_accum"].value == 4
    assert form.magic_view.value == "%nexa_train --zero 2 --bf16 --grad-accum 4"
    assert text(form.plan_view).startswith("DeepSpeed ZeRO-2, bf16, 1 x CPU (DEEPSPEED)")


def test_changing_controls_updates_plan_json_memory_and_magic_line(form):
    assert text(form.plan_view).startswith("single process, fp32, 1 x CPU (NO)")
    assert "ZeRO is off" in text(form.deepspeed_view)
    plain = model_state_memory(5, 5, stage=None)
    assert f"{format_bytes(plain.device_bytes)} per device" in text(form.memory_view)
    assert "model: 5 parameters, largest layer 5 (counted from the task's model)" in text(form.memory_view)

    set_controls(form, zero="3", offload_param="cpu")
    assert text(form.plan_view).startswith("DeepSpeed ZeRO-3 (offload params->cpu), fp32, 1 x CPU (DEEPSPEED)")
    zero = json.loads(text(form.deepspeed_view))["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    offloaded = model_state_memory(5, 5, stage=3, offload_param="cpu")
    assert f"{format_bytes(offloaded.device_bytes)} per device" in text(form.memory_view)
    assert "for --zero 3 --offload-param cpu" in text(form.memory_view)
    assert form.magic_view.value == "%nexa_train --zero 3 --offload-param cpu"

    set_controls(form, offload_param="none", precision="fp16", procs=2)
    assert form.magic_view.value == "%nexa_train --zero 3 --fp16 --procs 2"
    plan = text(form.plan_view)
    assert plan.startswith("DeepSpeed ZeRO-3, bf16, 2 x CPU (DEEPSPEED)")
    assert "note: fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead" in plan
    assert json.loads(text(form.deepspeed_view))["train_batch_size"] == 16
    assert form.error_view.value == "" and not form.train_button.disabled


def test_the_magic_line_cannot_be_edited(form):
    set_controls(form, zero="2")
    form.magic_view.value = "%nexa_train --zero 1"
    assert form.magic_view.value == "%nexa_train --zero 2"


def test_memory_is_unknown_without_a_task(magics):
    form = ConfigForm(magics.session, lambda: magics.task_named(None))
    assert text(form.memory_view).startswith("unknown: there is no variable 'task_for_the_form' in this notebook")
    assert not form.train_button.disabled  # the task may be defined before Train is clicked


@pytest.mark.parametrize(
    "controls, flags",
    [
        ({"zero": "2", "offload_param": "cpu"}, "--zero 2 --offload-param cpu"),
        ({"offload_optimizer": "cpu"}, "--offload cpu"),
        ({"target_batch": "30"}, "--target-batch 30"),
        ({"procs": 9}, "--procs 9"),  # refused by the plan: too many processes for 2 cores
    ],
)
def test_impossible_combinations_give_the_flags_message_and_disable_train(form, shell, magics, controls, flags):
    set_controls(form, **controls)
    message = flags_error(shell, flags)
    assert text(form.error_view) == message
    assert "color:var(--jp-error-color1" in form.error_view.value
    assert form.train_button.disabled and form.apply_button.disabled
    assert form.plan is None and form.deepspeed_view.value == ""
    assert form.magic_view.value == f"%nexa_train {flags}"

    set_controls(form, **{name: form_values(TrainConfig())[name] for name in controls})
    assert form.error_view.value == "" and not form.train_button.disabled


def test_the_micro_batch_takes_auto_as_the_flag_does(form, shell, magics):
    assert form.controls["batch_size"].value == "8"
    set_controls(form, batch_size="auto", target_batch="32")
    assert form.magic_view.value == "%nexa_train --batch-size auto --target-batch 32"
    assert form.error_view.value == "" and not form.train_button.disabled
    assert form.options()["batch_size"] == "auto"  # what Train runs: the sizes are tried then
    assert "--batch-size auto: planned here at micro-batch 1" in text(form.plan_view)

    set_controls(form, batch_size="eight", target_batch="")
    assert form.train_button.disabled and "batch_size" in text(form.error_view)
    assert text(form.error_view) == (
        """batch_size: expected a whole number or "auto", got 'eight'. Fix: give batch_size a whole number or "auto"."""
    )


# --- the buttons -------------------------------------------------------------------------------


def test_apply_as_defaults_sets_the_session_that_later_runs_resolve():
    defaults = Session(defaults={"seed": 7, "grad_accum": 4})
    form = ConfigForm(defaults, tiny_task)
    set_controls(form, zero="2", offload_optimizer="cpu", target_batch="16")
    form.apply_button.click()
    assert defaults.defaults["seed"] == 7 and "grad_accum" not in defaults.defaults  # the target derives it
    cfg = resolve_config(session=defaults.defaults)
    assert (cfg.zero, cfg.offload_optimizer, cfg.target_batch) == (2, "cpu", 16)
    assert cfg.source_of("zero") == "session"
    assert make_plan(cfg).grad_accum == 2
    assert "defaults set" in form.status_view.value


def test_config_widget_opens_the_form_over_the_magics_defaults(shell, magics, monkeypatch):
    shown = []
    monkeypatch.setattr(widgets_form, "display", shown.append)
    magics.session.defaults = {"precision": "bf16"}
    shell.run_line_magic("nexa_config", "--widget")
    (form,) = shown
    assert form.controls["precision"].value == "bf16"
    assert "application/vnd.jupyter.widget-view+json" in form._repr_mimebundle_()

    set_controls(form, zero="3", procs=2)
    form.apply_button.click()
    with capture_output() as captured:
        shell.run_line_magic("nexa_config", "")
    rows = {line.split()[0]: line.split()[1:] for line in captured.stdout.splitlines() if line.strip()}
    assert rows["zero"] == ["3", "session"] and rows["procs"] == ["2", "session"]
    assert rows["precision"] == ["bf16", "session"]


@pytest.mark.slow
def test_train_button_trains_the_task_under_the_form(form, monkeypatch):
    shown = []
    monkeypatch.setattr("nexa_nb.session.display", lambda obj: (shown.append(obj), display(obj)))
    before = api.last_result()
    set_controls(form, max_steps="3", procs=1)
    with capture_output() as captured:
        form.train_button.click()
    result = api.last_result()
    assert result is not before and result.status == "completed" and len(result.history) == 3
    assert result.plan.config.max_steps == 3 and result.num_processes == 1
    assert isinstance(shown[0], widgets.VBox)  # the live dashboard, shown once the checks passed
    picture, summary = captured.outputs  # then cleared for its static picture and the summary
    assert picture.data["text/plain"] == "completed 3 steps" and "image/svg+xml" in picture.data
    assert summary.data["text/markdown"].startswith("Trained 3 steps")
    assert shown[0].comm is None  # the live widgets are closed
    assert not form.train_button.disabled


def test_train_failure_is_shown_under_the_form(form):
    set_controls(form, batch_size="64", grad_accum=2)  # 128 samples per step, the data has 64
    with capture_output() as captured:
        form.train_button.click()
    (output,) = captured.outputs
    assert "one optimizer step needs 128 samples" in output.data["text/html"]
    assert not form.train_button.disabled


def test_importing_the_form_imports_no_torch():
    code = "import sys, nexa_nb.widgets_form; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
