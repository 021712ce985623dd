"""The source guides' environment variables: config files, mixed precision on/off, the workers'
log level, and DeepSpeed's CPU activation checkpointing (refused, with why), each shown by
``%nexa_config`` with the variable as its source, and each bad value one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

import nexa_nb
from nexa_nb.config import ConfigError, resolve_config
from nexa_nb.events import RecordingSink
from tests.conftest import regression_task
from tests.test_quiet_cell import run_script

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIABLES = (
    "ACCELERATE_CONFIG_FILE",
    "DEEPSPEED_CONFIG_FILE",
    "ENABLE_MIXED_PRECISION",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_LOG_LEVEL",
    "DEEPSPEED_CPU_CHECKPOINTING",
)


@pytest.fixture
def shell(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nexa_nb")
    return shell


def config_rows(shell, capsys) -> dict[str, tuple[str, str]]:
    """``%nexa_config``'s table: field -> (value, source)."""
    capsys.readouterr()
    shell.run_line_magic("nexa_config", "")
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split(maxsplit=2)
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2].strip())
    return rows


@pytest.mark.parametrize(
    "environment, field, value, source",
    [
        (
            {"ACCELERATE_CONFIG_FILE": str(CONFIGS / "deepspeed_zero2.yaml")},
            "zero",
            "2",
            f"env:ACCELERATE_CONFIG_FILE ({CONFIGS / 'deepspeed_zero2.yaml'})",
        ),
        (
            {"DEEPSPEED_CONFIG_FILE": str(CONFIGS / "zero2.json")},
            "zero",
            "2",
            f"env:DEEPSPEED_CONFIG_FILE ({CONFIGS / 'zero2.json'})",
        ),
        (
            {"ENABLE_MIXED_PRECISION": "false", "ACCELERATE_MIXED_PRECISION": "bf16"},
            "precision",
            "no",
            "env:ENABLE_MIXED_PRECISION",
        ),
        ({"ENABLE_MIXED_PRECISION": "true"}, "precision", "fp16", "env:ENABLE_MIXED_PRECISION"),
        ({"ACCELERATE_LOG_LEVEL": "INFO"}, "log_level", "info", "env:ACCELERATE_LOG_LEVEL"),
    ],
)
def test_nexa_config_shows_the_variable_as_the_source(environment, field, value, source, shell, capsys, monkeypatch):
    for name, text in environment.items():
        monkeypatch.setenv(name, text)
    assert config_rows(shell, capsys)[field] == (value, source)


def test_a_file_passed_replaces_the_files_the_environment_names(monkeypatch):
    environ = {"DEEPSPEED_CONFIG_FILE": str(CONFIGS / "zero2.json")}
    cfg = resolve_config(config_file=CONFIGS / "zero3_offload.json", environ=environ)
    assert cfg.zero == 3 and cfg.source_of("zero") == str(CONFIGS / "zero3_offload.json")


def test_a_config_file_from_the_environment_ranks_as_a_file_under_the_flags():
    cfg = resolve_config(environ={"DEEPSPEED_CONFIG_FILE": str(CONFIGS / "zero2.json")}, arguments={"zero": 3})
    assert cfg.zero == 3 and cfg.source_of("zero") == "argument"


@pytest.mark.parametrize(
    "environment, says",
    [
        ({"ACCELERATE_CONFIG_FILE": "missing.yaml"}, "env ACCELERATE_CONFIG_FILE: 'missing.yaml' is not an existing"),
        ({"DEEPSPEED_CONFIG_FILE": str(CONFIGS / "cpu_multi.yaml")}, "env DEEPSPEED_CONFIG_FILE:"),
        ({"ENABLE_MIXED_PRECISION": "maybe"}, "env ENABLE_MIXED_PRECISION: 'maybe' is not a boolean"),
        ({"ACCELERATE_LOG_LEVEL": "verbose"}, "(from env:ACCELERATE_LOG_LEVEL)"),
        ({"DEEPSPEED_CPU_CHECKPOINTING": "true"}, "env DEEPSPEED_CPU_CHECKPOINTING:"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_nothing_starts(environment, says, monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, text in environment.items():
        monkeypatch.setenv(name, text)
    quiet = RecordingSink()
    with pytest.raises(ConfigError) as refused:
        nexa_nb.train(regression_task(), sinks=[quiet], ckpt_dir=str(tmp_path / "ckpt"))
    message = str(refused.value)
    assert says in message and "Fix:" in message and "\n" not in message
    assert quiet.events == [] and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_the_log_level_reaches_the_workers_loggers():
    printed = run_script("""
        import logging, os, torch, nexa_nb
        os.environ["ACCELERATE_LOG_LEVEL"] = "debug"
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        def loss_fn(out, batch):
            levels = logging.getLogger("accelerate").level, logging.getLogger("DeepSpeed").level
            print("rank", os.environ.get("RANK", "kernel"), "levels", *levels)
            return torch.nn.functional.mse_loss(out, batch[-1])
        task = nexa_nb.Task(lambda: torch.nn.Linear(4, 1), list(zip(x, x.sum(1, keepdim=True))), loss_fn=loss_fn)
        nexa_nb.train(task, procs=2, batch_size=4, max_steps=1, sinks=[])
        print("kernel level", logging.getLogger("accelerate").level)
    """)
    lines = set(printed.splitlines())
    assert {"rank 0 levels 10 10", "rank 1 levels 10 10"} <= lines  # DEBUG is 10
    assert "kernel level 0" in lines  # the kernel's own loggers are left alone
