"""Every setting is declared once, and everything that derives from the declaration agrees:
the %nexa_* flags and their help, the keywords of nexa_nb.train, the form, the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from IPython.utils.capture import capture_output

import nexa_nb
from nexa_nb.config import ConfigError, resolve_config
from nexa_nb.flags import magic_line, options_of, parse
from nexa_nb.settings import FIELDS, settings_markdown
from nexa_nb.widgets_form import FORM_FIELDS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings table: start -->", "<!-- settings table: end -->"

# A value other than the default for each field, as a flag types it, and the value it means.
TYPED = {
    "precision": ("--bf16", "bf16"),
    "strict": ("--strict", True),
    "batch_size": ("--batch-size 4", 4),
    "grad_accum": ("--grad-accum 2", 2),
    "target_batch": ("--target-batch 16", 16),
    "lr_scaling": ("--lr-scaling sqrt", "sqrt"),
    "lr_reference_batch": ("--lr-reference-batch 4", 4),
    "procs": ("--procs 2", 2),
    "num_machines": ("--num-machines 2", 2),
    "zero": ("--zero 3", 3),
    "offload_optimizer": ("--offload cpu", "cpu"),
    "offload_param": ("--offload-param cpu", "cpu"),
    "nvme_path": ("--nvme-path .", "."),
    "fsdp": ("--fsdp", True),
    "find_unused_parameters": ("--find-unused-parameters", True),
    "grad_ckpt": ("--grad-ckpt", True),
    "max_memory_usage": ("--max-memory-usage 0.8", 0.8),
    "memory_safety_margin": ("--memory-safety-margin 0.05", 0.05),
    "memory_budget": ("--memory-budget 2000000000", 2_000_000_000),
    "lora": ("--lora", True),
    "lora_r": ("--lora-r 4", 4),
    "lora_alpha": ("--lora-alpha 8", 8),
    "lora_dropout": ("--lora-dropout 0.1", 0.1),
    "lora_target_modules": ("--lora-target-modules q,v", ("q", "v")),
    "lr": ("--lr 0.02", 0.02),
    "weight_decay": ("--weight-decay 0.01", 0.01),
    "clip_norm": ("--clip-norm none", None),
    "warmup_steps": ("--warmup-steps 3", 3),
    "scheduler": ("--scheduler cosine", "cosine"),
    "epochs": ("--epochs 2", 2),
    "max_steps": ("--max-steps 5", 5),
    "seed": ("--seed 3", 3),
    "ckpt_dir": ("--ckpt-dir ck", "ck"),
    "ckpt_every": ("--ckpt-every 5", 5),
    "resume": ("--resume latest", "latest"),
    "eval_every": ("--eval-every 5", 5),
    "trackers": ("--trackers tensorboard,mlflow", ("tensorboard", "mlflow")),
    "log_dir": ("--log-dir logs", "logs"),
    "log_level": ("--log-level info", "info"),
    "output_dir": ("--output-dir out", "out"),
    "merge_lora": ("--merge-lora", True),
    "run_dir": ("--run-dir runs/a", "runs/a"),
    "detach": ("--detach", True),
    "slurm": ("--slurm partition=debug,time=5", "partition=debug,time=5"),
    "force_cpu": ("--force-cpu", True),
}


def test_every_field_is_covered_here():
    assert set(TYPED) == set(FIELDS)


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_has_a_flag_in_the_help_that_parses_to_its_value(shell, name):
    f = FIELDS[name]
    magic = shell.find_line_magic("nexa_train")
    flags = [flag for flag in (f.flag, *f.meta.aliases, *(s for s, _ in f.meta.shortcuts)) if flag]
    assert flags or f.meta.no_flag, f"{name} has neither a flag nor a reason for none"
    for flag in flags:
        assert re.search(rf"{flag}\b", magic.__doc__), f"{flag} is not in %nexa_train?"
    line, value = TYPED[name]
    assert options_of(parse(magic, line)) == {name: value}
    assert magic_line({name: value}) == f"%nexa_train {line}"


# What a value needs beside it to pass the rules that involve several fields.
CONTEXT = {
    "offload_optimizer": {"zero": 2},
    "offload_param": {"zero": 3},
    "resume": {"ckpt_dir": "ck"},
    "ckpt_every": {"ckpt_dir": "ck"},
    "merge_lora": {"lora": True},
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_flag_name_and_alias_is_a_keyword_meaning_the_same(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = FIELDS[name]
    _, value = TYPED[name]
    for keyword in f.keywords:
        config = resolve_config(environ={}, arguments={**CONTEXT.get(name, {}), keyword: value})
        assert (getattr(config, name), config.source_of(name)) == (value, "argument"), keyword
    for keyword, const in f.shortcut_keywords.items():
        assert getattr(resolve_config(environ={}, arguments={keyword: True}), name) == const


@pytest.mark.parametrize("keyword", sorted({k for f in FIELDS.values() for k in f.keywords}))
def test_nexa_nb_train_takes_every_keyword(keyword):
    """A value of the wrong type is refused by train itself, before any process starts, naming the field."""
    task = nexa_nb.Task(torch.nn.Linear(2, 1), [torch.zeros(2)] * 4)
    with pytest.raises(ConfigError) as info:
        nexa_nb.train(task, **{keyword: {"wrong": "type"}})
    assert info.value.field == next(f.name for f in FIELDS.values() if keyword in f.keywords)


def test_two_keywords_for_one_field_are_refused():
    with pytest.raises(ConfigError, match="given twice, as offload= and offload_optimizer="):
        resolve_config(environ={}, arguments={"zero": 2, "offload": "cpu", "offload_optimizer": "cpu"})


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_has_a_form_control_or_a_reason(name):
    f = FIELDS[name]
    assert (name in FORM_FIELDS) == (f.meta.label is not None)
    assert name in FORM_FIELDS or f.meta.no_form, f"{name} is not in the form and says not why"


def test_the_readme_settings_table_is_generated_from_the_declarations():
    text = README.read_text()
    assert START in text and END in text
    table = text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert table == settings_markdown(), (
        "README.md's settings table is stale; regenerate it: "
        "python -c 'import nexa_nb.settings as s; s.write_readme_table(\"README.md\")'"
    )
    for name in FIELDS:
        assert f"| `{name}` |" in table


@pytest.mark.parametrize("line", ["-h", "--help", "--zero 3 --help"])
def test_help_flag_prints_the_help(shell, line):
    with capture_output() as captured:
        assert shell.run_line_magic("nexa_train", line) is None
    assert captured.stdout.strip() == shell.find_line_magic("nexa_train").__doc__.strip()
    assert "--offload-param" in captured.stdout


def regression_task() -> nexa_nb.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return nexa_nb.Task(
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)),
        list(zip(x, y)),
        loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[-1]),
    )


@pytest.mark.slow
@pytest.mark.parametrize("offload", [{"offload": "cpu"}, {"offload_optimizer": "cpu"}])
def test_train_with_the_offload_keyword_runs_deepspeed_in_two_processes(offload):
    result = nexa_nb.train(
        regression_task(), zero=3, offload_param="cpu", procs=2, batch_size=8, max_steps=6, lr=0.01, sinks=[], **offload
    )
    assert (result.status, result.distributed_type, result.num_processes) == ("completed", "DEEPSPEED", 2)
    assert result.plan.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert result.plan.deepspeed_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert result.losses[-1] < result.losses[0]


def test_several_machines_are_refused_for_a_run_from_the_notebook():
    """The launcher forks every process on this machine: two machines' worth of processes here would
    train as a different world than the user asked for."""
    with pytest.raises(ConfigError, match="trains on this machine only") as info:
        nexa_nb.train(regression_task(), num_machines=2, procs=1, max_steps=1)
    assert info.value.field == "num_machines" and "%nexa_export" in info.value.fix
