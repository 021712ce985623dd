"""The %nexa_* magics through a real IPython shell.

Most tests replace `nexa_nb.api.train` by a recorder, to check what the core receives; a few
train for real (tiny models, a handful of steps), among them ZeRO-3 in two CPU processes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from IPython.core.error import UsageError

import nexa_nb
from nexa_nb import api, launch, memory, text
from nexa_nb.api import prepare
from nexa_nb.config import FIELD_NAMES, resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.hardware import Gpu, Hardware, probe
from nexa_nb.session import Session

GiB = 2**30
CPU_HOST = Hardware(cpu_cores=2, host_memory_bytes=16 * GiB, host_available_bytes=12 * GiB)
GPU_HOST = Hardware(
    gpus=(Gpu("NVIDIA H100", 80 * GiB),) * 2,
    cpu_cores=16,
    host_memory_bytes=256 * GiB,
    host_available_bytes=200 * GiB,
    bf16_gpu=True,
)
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
ON_GPU = probe().has_cuda


def mse(outputs, batch):
    return torch.nn.functional.mse_loss(outputs.float(), batch[-1].float())


def boom(outputs, batch):
    raise RuntimeError("boom in the loss")


def linear_data(n: int = 64):
    """y = x . w, learnable by a Linear(4, 1): full-batch steps make the loss fall every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return list(zip(x, x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]])))


def linear_task(data=None, loss_fn=mse) -> nexa_nb.Task:
    return nexa_nb.Task(lambda: torch.nn.Linear(4, 1), linear_data() if data is None else data, loss_fn=loss_fn)


@pytest.fixture
def nexa(shell, tmp_path, monkeypatch):
    """The NexaMagics of the shell, fresh: no defaults, console output, a CPU host, cwd in tmp_path."""
    magics = shell.magics_manager.registry["NexaMagics"]
    monkeypatch.chdir(tmp_path)
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("nexa_nb.commands.plan.probe", lambda: CPU_HOST)
    monkeypatch.setattr("nexa_nb.commands.status.probe", lambda: CPU_HOST)
    monkeypatch.setattr("nexa_nb.plan.probe", lambda: CPU_HOST)
    monkeypatch.setattr(magics, "session", Session())
    for trait, value in (("dashboard", False), ("default_task", "task"), ("refresh_interval", 0.25)):
        monkeypatch.setattr(magics, trait, value)
    names = set(shell.user_ns)
    shell.user_ns["task"] = linear_task()
    yield magics
    for name in set(shell.user_ns) - names:
        del shell.user_ns[name]


@pytest.fixture
def core(monkeypatch):
    """Record what `nexa_nb.api.train` receives instead of training."""
    calls = []

    def train(task, *, config=None, session=None, sinks=None, on_plan=None, **options):
        calls.append(dict(options, task=task, config=config, session=session, sinks=sinks, on_plan=on_plan))
        if on_plan is not None:  # what the real train does before starting workers
            on_plan(prepare(task, resolve_config(config_file=config, session=session, arguments=options)))
        return "trained"

    monkeypatch.setattr(api, "train", train)
    return calls


def options(call: dict) -> dict:
    return {k: v for k, v in call.items() if k not in ("task", "config", "session", "sinks", "on_plan")}


def usage_error(shell, magic: str, line: str) -> str:
    with pytest.raises(UsageError) as info:
        shell.run_line_magic(magic, line)
    return str(info.value)


# --- loading and help ---------------------------------------------------------------------------


def test_load_ext_is_fast_and_imports_no_torch(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        start = time.perf_counter()
        shell.run_line_magic("load_ext", "nexa_nb")
        elapsed = time.perf_counter() - start
        for line in ("", "--zero 2 --bf16", "--save acc.yaml"):
            shell.run_line_magic("nexa_config", line)
        shell.run_line_magic("nexa_status", "")
        shell.run_line_magic("nexa_plan", "--params 7B --gpus 8 --gpu-mem 80")
        print(elapsed, [m for m in ("torch", "deepspeed", "accelerate") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    elapsed, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]"
    assert float(elapsed) < 1.0


def test_loading_again_keeps_one_instance_and_its_defaults(shell, nexa):
    shell.run_line_magic("nexa_config", "--zero 2")
    shell.run_line_magic("reload_ext", "nexa_nb")
    nexa_nb.load_ipython_extension(shell)
    assert shell.magics_manager.registry["NexaMagics"] is nexa
    assert sum(type(c).__name__ == "NexaMagics" for c in shell.configurables) == 1
    assert nexa.session.defaults == {"zero": 2}


FLAGS = (
    "--zero",
    "--offload",
    "--offload-optimizer",
    "--offload-param",
    "--nvme-path",
    "--fp16",
    "--bf16",
    "--fp32",
    "--strict",
    "--batch-size",
    "--grad-accum",
    "--target-batch",
    "--procs",
    "--epochs",
    "--max-steps",
    "--lr",
    "--seed",
    "--lora",
    "--lora-r",
    "--lora-alpha",
    "--grad-ckpt",
    "--ckpt-dir",
    "--ckpt-every",
    "--resume",
    "--config",
)


@pytest.mark.parametrize("magic", ["nexa_train", "nexa_config", "nexa_export"])
def test_help_lists_every_flag(shell, magic):
    doc = shell.find_line_magic(magic).__doc__
    for flag in FLAGS:
        assert flag in doc
    assert "[--fp16 | --bf16 | --fp32]" in doc
    assert "{0,1,2,3,none}" in doc and "{none,cpu,nvme}" in doc


def test_question_mark_help(shell, capsys):
    shell.run_line_magic("pinfo", "%nexa_train")
    out = capsys.readouterr().out
    assert "--offload-param" in out
    assert "--zero 3 --offload cpu keeps the parameters on the device" in " ".join(out.split())
    for magic, words in (
        ("nexa_plan", ("--params", "--gpus", "--gpu-mem")),
        ("nexa_status", ("--traceback",)),
        ("nexa_config", ("--reset", "--save", "--widget")),
    ):
        doc = shell.find_line_magic(magic).__doc__
        assert all(word in doc for word in words)


# --- %nexa_train: what the core receives ---------------------------------------------------------


def make_checkpoint(folder: Path) -> Path:
    step = folder / "step-0000001"
    step.mkdir(parents=True)
    (step / "nexa_state.json").write_text(json.dumps({"step": 1, "zero": None, "procs": 1}))
    return folder


@pytest.mark.parametrize(
    "line, expected",
    [
        ("", {}),
        ("--zero 2 --offload cpu", {"zero": 2, "offload_optimizer": "cpu"}),
        (
            "--zero 3 --offload-optimizer cpu --offload-param cpu",
            {"zero": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
        ),
        ("--zero 3 --offload nvme --nvme-path {tmp}", {"zero": 3, "offload_optimizer": "nvme", "nvme_path": "{tmp}"}),
        ("--fp16", {"precision": "fp16"}),
        ("--bf16 --strict", {"precision": "bf16", "strict": True}),
        ("--fp32", {"precision": "no"}),
        ("--batch-size 4 --grad-accum 2 --procs 2", {"batch_size": 4, "grad_accum": 2, "procs": 2}),
        ("--batch-size 4 --procs 2 --target-batch 32", {"batch_size": 4, "procs": 2, "target_batch": 32}),
        ("--epochs 2 --max-steps 5 --lr 0.01 --seed 7", {"epochs": 2, "max_steps": 5, "lr": 0.01, "seed": 7}),
        (
            "--lora --lora-r 4 --lora-alpha 8 --grad-ckpt",
            {"lora": True, "lora_r": 4, "lora_alpha": 8, "grad_ckpt": True},
        ),
        ("--ckpt-dir ckpt --ckpt-every 2", {"ckpt_dir": "ckpt", "ckpt_every": 2}),
        ("--ckpt-dir {tmp} --resume latest", {"ckpt_dir": "{tmp}", "resume": "latest"}),
    ],
)
def test_flags_become_the_options_the_core_receives(shell, nexa, core, tmp_path, line, expected):
    tmp = str(make_checkpoint(tmp_path / "given"))
    shell.run_line_magic("nexa_train", line.format(tmp=tmp))
    (call,) = core
    assert options(call) == {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in expected.items()}
    assert call["task"] is shell.user_ns["task"] and call["session"] == {} and call["config"] is None


def test_task_argument_config_file_and_return_value(shell, nexa, core, tmp_path):
    shell.user_ns["my_task"] = linear_task()
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    shell.run_cell("res = %nexa_train my_task --config ds.json --max-steps 2")
    (call,) = core
    assert call["task"] is shell.user_ns["my_task"] and call["config"] == "ds.json"
    assert options(call) == {"max_steps": 2}
    assert shell.user_ns["res"] == "trained"


def test_config_file_set_by_nexa_config_is_inherited(shell, nexa, core, tmp_path):
    for name, stage in (("ds.json", 1), ("other.json", 2)):
        (tmp_path / name).write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    shell.run_line_magic("nexa_config", "--config ds.json")
    shell.run_line_magic("nexa_train", "")
    shell.run_line_magic("nexa_train", "--config other.json")
    assert [call["config"] for call in core] == ["ds.json", "other.json"]
    assert nexa.session.resolve().source_of("zero") == "ds.json"


def test_config_default_task(shell, nexa, core):
    shell.user_ns["my_task"] = linear_task()
    shell.run_line_magic("config", 'NexaMagics.default_task = "my_task"')
    shell.run_line_magic("nexa_train", "--max-steps 1")
    assert core[0]["task"] is shell.user_ns["my_task"]


def test_plan_and_fallback_note_printed_before_training(shell, nexa, core, capsys):
    shell.run_line_magic("nexa_train", "--zero 3 --fp16 --procs 2")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "DeepSpeed ZeRO-3, bf16, 2 x CPU (DEEPSPEED)"
    assert out[1].startswith("batch: micro 8 x accumulation 1 x 2 procs = effective 16")
    assert out[2] == "note: fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead"


def test_session_defaults_are_inherited_and_flags_win(shell, nexa, core, capsys):
    shell.run_line_magic("nexa_config", "--grad-accum 2 --batch-size 4")
    shell.run_line_magic("nexa_train", "--max-steps 3")
    shell.run_line_magic("nexa_train", "--grad-accum 1")
    first, second = core
    assert first["session"] == second["session"] == {"grad_accum": 2, "batch_size": 4}
    assert options(first) == {"max_steps": 3} and options(second) == {"grad_accum": 1}
    out = capsys.readouterr().out
    assert "batch: micro 4 x accumulation 2 x 1 procs = effective 8" in out
    assert "batch: micro 4 x accumulation 1 x 1 procs = effective 4" in out
    shell.run_line_magic("nexa_config", "--reset")
    assert nexa.session.defaults == {}


def test_dashboard_is_finalized_when_a_worker_fails(shell, nexa, monkeypatch, capsys):
    from nexa_nb.sinks import dashboard

    boards = []

    class Recorded(dashboard.Dashboard):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.finalized = False
            boards.append(self)

        def finalize(self):
            self.finalized = True
            super().finalize()

    def fail(task, *, config=None, session=None, sinks=None, on_plan=None, **options):
        on_plan(prepare(task, resolve_config(config_file=config, session=session, arguments=options)))
        raise TrainingError("rank 1: RuntimeError: out of luck", "Traceback (most recent call last):\n  boom\n")

    monkeypatch.setattr(dashboard, "Dashboard", Recorded)
    monkeypatch.setattr(api, "train", fail)
    shell.run_line_magic("config", "NexaMagics.dashboard = True")
    shell.run_line_magic("config", "NexaMagics.refresh_interval = 0.05")
    message = usage_error(shell, "nexa_train", "--procs 2")
    assert message == "rank 1: RuntimeError: out of luck (the worker's traceback: %nexa_status --traceback)"
    (board,) = boards
    assert board.finalized and board.refresh_interval == 0.05
    capsys.readouterr()
    shell.run_line_magic("nexa_status", "--traceback")
    assert capsys.readouterr().out == "Traceback (most recent call last):\n  boom\n\n"


# --- bad input --------------------------------------------------------------------------------


def bad_tasks(tmp_path: Path) -> dict:
    (tmp_path / "unreadable.yaml").write_bytes(b"\xff\xfe\x00not text")
    (tmp_path / "afile").write_text("")
    return {
        "not_a_task": 3,
        "strings_task": linear_task(data=["a sample"] * 64),
        "empty_task": linear_task(data=[]),
    }


BAD_LINES = [
    ("--foo", "unrecognized arguments: --foo", "Fix: remove them"),
    ("--zero 7", "argument --zero: '7' is not a ZeRO stage; use 0, 1, 2, 3 or none", "Fix: correct the line"),
    ("--procs 0", "procs: must be at least 1, got 0", "Fix: pass --procs 1 or more"),
    ("--lr abc", "argument --lr: invalid float value: 'abc'", "Fix: give a value of the right type"),
    ("--fp16 --bf16", "argument --bf16: not allowed with argument --fp16", "Fix: keep only one"),
    (
        "--grad-accum 2 --target-batch 64",
        "--grad-accum 2 contradicts --target-batch 64",
        "Fix: pass only one of --grad-accum and --target-batch",
    ),
    ("--zero 1 --offload-param cpu", "parameter offload needs ZeRO stage 3", "Fix: pass --zero 3"),
    ("--zero 2 --offload nvme", "NVMe offload needs a folder", "Fix: pass --nvme-path DIR"),
    ("--fp16 --strict", "fp16 needs a CUDA GPU", "Fix: pass --bf16 or --fp32"),
    ("missing_task", "there is no variable 'missing_task'", "Fix: define it"),
    ("not_a_task", "'not_a_task' is a int, not a nexa_nb.Task", "Fix: wrap your model and data"),
    ("strings_task", "a batch must be a tensor", "pass Task(collate_fn=...)"),
    ("empty_task", "train_data is empty", "give the task at least one batch"),
    ("--batch-size 100", "train_data has 64", "lower --batch-size"),
    ("--config missing.yaml", "'missing.yaml' does not exist", "Fix: check the path"),
    ("--config unreadable.yaml", "cannot read accelerate config file", "Fix: make the file readable"),
    ("--ckpt-dir afile/ckpt", "'afile/ckpt' cannot be written", "Fix: pass a writable folder to --ckpt-dir"),
    ("--ckpt-every 2", "a checkpoint interval needs a folder", "Fix: pass --ckpt-dir DIR"),
    ("--resume nowhere", "checkpoint 'nowhere' does not exist", "Fix: pass a folder written by a previous run"),
    ("--ckpt-dir 'unclosed", "No closing quotation", "Fix: close the quote"),
]


@pytest.mark.parametrize("line, problem, fix", BAD_LINES)
def test_bad_input_is_one_line_and_starts_nothing(shell, nexa, monkeypatch, tmp_path, line, problem, fix):
    shell.user_ns.update(bad_tasks(tmp_path))
    launched = []
    monkeypatch.setattr(launch, "launch", lambda *args, **kwargs: launched.append(args))
    before, files = nexa_nb.last_result(), sorted(tmp_path.rglob("*"))
    message = usage_error(shell, "nexa_train", line)
    assert "\n" not in message and problem in message and fix in message
    assert launched == [] and nexa_nb.last_result() is before and sorted(tmp_path.rglob("*")) == files


def test_usage_error_shows_as_one_line_without_traceback(shell, nexa, capsys):
    result = shell.run_cell("%nexa_train --zero 7")
    assert isinstance(result.error_in_exec, UsageError)
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "UsageError: argument --zero: '7' is not a ZeRO stage; use 0, 1, 2, 3 or none. "
        "Fix: correct the line (%nexa_train? lists every flag)."
    ]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize(
    "line", ["--zero 1 --offload-param cpu", "--procs 0", "--fp16 --bf16", "--config missing.json"]
)
def test_bad_config_flags_leave_the_defaults_alone(shell, nexa, line):
    shell.run_line_magic("nexa_config", "--zero 2")
    message = usage_error(shell, "nexa_config", line)
    assert "\n" not in message and "Fix" in message
    assert nexa.session.defaults == {"zero": 2} and nexa.session.config_file is None


# --- %nexa_config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, fields, ds_zero",
    [
        (
            "--zero 3 --offload cpu",
            {"zero": 3, "offload_optimizer": "cpu", "offload_param": "none"},
            {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}},
        ),
        (
            "--zero 3 --offload cpu --offload-param cpu",
            {"offload_optimizer": "cpu", "offload_param": "cpu"},
            {"offload_param": {"device": "cpu", "pin_memory": False}},
        ),
        ("--batch-size 4 --procs 2 --target-batch 32", {"target_batch": 32}, None),
        (
            "--lora --lora-r 4 --lora-alpha 8 --grad-ckpt --seed 3",
            {"lora": True, "lora_r": 4, "grad_ckpt": True, "seed": 3},
            None,
        ),
        (
            "--epochs 3 --lr 0.02 --ckpt-dir ckpt --ckpt-every 5",
            {"epochs": 3, "lr": 0.02, "ckpt_dir": "ckpt", "ckpt_every": 5},
            None,
        ),
        (
            "--weight-decay 0.01 --warmup-steps 10 --scheduler cosine --clip-norm 0.5 --eval-every 20",
            {"weight_decay": 0.01, "warmup_steps": 10, "scheduler": "cosine", "clip_norm": 0.5, "eval_every": 20},
            None,
        ),
        (
            "--lr-scaling sqrt --lora --lora-dropout 0.1 --force-cpu",
            {"lr_scaling": "sqrt", "lora_dropout": 0.1, "force_cpu": True},
            None,
        ),
    ],
)
def test_config_flags_resolve_to_the_plan(shell, nexa, line, fields, ds_zero):
    shell.run_line_magic("nexa_config", line)
    cfg = nexa.session.resolve()
    assert {name: getattr(cfg, name) for name in fields} == fields
    assert all(cfg.source_of(name) == "session" for name in fields if name != "offload_param")
    plan = nexa_nb.make_plan(cfg)
    if ds_zero is None:
        assert plan.deepspeed_config is None
    else:
        zero = plan.deepspeed_config["zero_optimization"]
        assert {key: zero.get(key) for key in ds_zero} == ds_zero
    if "target_batch" in fields:
        assert (plan.grad_accum, plan.effective_batch) == (4, 32)


@pytest.mark.parametrize(
    "default, line, field", [("--zero 2", "--zero none", "zero"), ("--clip-norm 0.5", "--clip-norm none", "clip_norm")]
)
def test_none_on_the_train_line_overrides_a_session_default(shell, nexa, core, default, line, field):
    shell.run_line_magic("nexa_config", default)
    shell.run_line_magic("nexa_train", line)
    assert options(core[-1])[field] is None
    assert getattr(resolve_config(session=core[-1]["session"], arguments=options(core[-1])), field) is None


def test_config_table_names_every_source(shell, nexa, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GRADIENT_ACCUMULATION_STEPS", "4")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    shell.run_line_magic("nexa_config", "--config ds.json --bf16")
    capsys.readouterr()
    shell.run_line_magic("nexa_config", "")
    out = capsys.readouterr().out
    table, _, rest = out.partition("\n\n")
    rows = {row.split()[0]: row.split()[1:] for row in table.splitlines()[1:]}
    assert table.split()[:3] == ["field", "value", "source"] and set(rows) == set(FIELD_NAMES)
    assert rows["precision"] == ["bf16", "session"]
    assert rows["grad_accum"] == ["4", "env:GRADIENT_ACCUMULATION_STEPS"]
    assert rows["zero"] == ["2", "ds.json"]
    assert rows["lr"] == ["0.001", "default"]
    plan_lines, _, ds_json = rest.partition("DeepSpeed config:\n")
    assert plan_lines.startswith("DeepSpeed ZeRO-2, bf16, 1 x CPU (DEEPSPEED)")
    assert json.loads(ds_json)["zero_optimization"]["stage"] == 2


def saved_yaml(shell, line: str, path: str = "acc.yaml") -> dict:
    shell.run_line_magic("nexa_config", f"{line} --save {path}")
    return yaml.safe_load(Path(path).read_text())


def test_config_save_writes_an_accelerate_config(shell, nexa, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_write_me")
    data = saved_yaml(shell, "--zero 3 --offload cpu --bf16 --procs 2 --grad-accum 2")
    assert {k: data[k] for k in ("distributed_type", "num_processes", "mixed_precision", "use_cpu")} == {
        "distributed_type": "DEEPSPEED",
        "num_processes": 2,
        "mixed_precision": "bf16",
        "use_cpu": True,
    }
    ds = data["deepspeed_config"]
    assert (ds["zero_stage"], ds["offload_optimizer_device"], ds["offload_param_device"]) == (3, "cpu", "none")
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (2, 1.0)
    assert "hf_do_not_write_me" not in Path("acc.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.yaml"]

    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file("acc.yaml").distributed_type.value == "DEEPSPEED"
    cfg = resolve_config(config_file="acc.yaml")  # read back by nexa_nb: the same setup
    assert (cfg.zero, cfg.offload_optimizer, cfg.precision, cfg.procs, cfg.grad_accum) == (3, "cpu", "bf16", 2, 2)


def test_config_save_of_plain_runs(shell, nexa):
    assert saved_yaml(shell, "--procs 1")["distributed_type"] == "NO"
    data = saved_yaml(shell, "--procs 2")  # CPU processes: what accelerate launch starts as several
    assert (data["distributed_type"], data["num_processes"], data["use_cpu"]) == ("MULTI_GPU", 2, True)


def test_config_save_failure_writes_nothing(shell, nexa, tmp_path):
    (tmp_path / "folder").mkdir()
    message = usage_error(shell, "nexa_config", "--save folder")
    assert message.startswith("cannot write 'folder'") and "Fix" in message and "\n" not in message
    assert [p.name for p in tmp_path.rglob("*")] == ["folder"]


def accelerate_cli(*args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra_env)
    return subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_saved_config_passes_accelerate_test(shell, nexa, tmp_path):
    saved_yaml(shell, "--procs 2")
    # accelerate's test script builds a plain Accelerator(): on a CPU host its workers join one
    # process group only when told to use the CPU, as the saved YAML's header says.
    out = accelerate_cli("test", "--config_file", "acc.yaml", cwd=tmp_path, ACCELERATE_USE_CPU="1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Test is a success" in out.stdout
    assert out.stdout.count("Num processes: 2") == 2


@pytest.mark.slow
def test_saved_deepspeed_config_runs_under_accelerate_launch(shell, nexa, tmp_path):
    saved_yaml(shell, "--zero 3 --bf16 --procs 2")
    (tmp_path / "show.py").write_text(
        # one write per line: two processes share the pipe, and print's pieces would interleave
        "import os\nprint(f\"WORLD {os.environ['WORLD_SIZE']} {os.environ['ACCELERATE_USE_DEEPSPEED']}\", flush=True)\n"
    )
    out = accelerate_cli("launch", "--config_file", "acc.yaml", "show.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("WORLD 2 true") == 2


# --- %nexa_plan -------------------------------------------------------------------------------


def plan_output(shell, capsys, line: str) -> list[str]:
    capsys.readouterr()
    shell.run_line_magic("nexa_plan", line)
    return capsys.readouterr().out.splitlines()


def test_plan_for_given_parameters_and_gpus(shell, nexa, capsys):
    out = plan_output(shell, capsys, "--params 7B --gpus 8 --gpu-mem 80")
    assert out[0] == "model: 7,000,000,000 parameters, largest layer 7,000,000,000 (given)"
    assert out[1] == "devices: 8 (80.00 GiB each); host: 12.00 GiB available"
    assert out[2].split() == ["setup", "per", "device", "host", "NVMe", "disk"]
    rows = [re.split(r"\s{2,}", row.strip()) for row in out[3:11]]
    labels = [
        "plain Accelerate",
        "--zero 0",
        "--zero 1",
        "--zero 2",
        "--zero 2 --offload cpu",
        "--zero 3",
        "--zero 3 --offload cpu",
        "--zero 3 --offload cpu --offload-param cpu",
    ]
    expected = [
        [memory.format_bytes(r.device_bytes), memory.format_bytes(r.host_bytes)]
        for r in memory.memory_table(7 * 10**9, 7 * 10**9, gpus_per_node=8)
    ]
    assert rows == [[label, *sizes] for label, sizes in zip(labels, expected)]
    # ZeRO-3 offloading to NVMe: the disk takes the optimizer state (16 bytes per parameter), then
    # also the 16-bit parameters (2 more); the device holds what it does with cpu offload.
    nvme = [re.split(r"\s{2,}", row.strip()) for row in out[11:13]]
    assert [row[0] for row in nvme] == ["--zero 3 --offload nvme", "--zero 3 --offload nvme --offload-param nvme"]
    cpu = memory.memory_table(7 * 10**9, 7 * 10**9, gpus_per_node=8)[6:8]
    rows = memory.nvme_rows(7 * 10**9, 7 * 10**9, gpus_per_node=8)
    for row, on_cpu, (state, on_disk), per_param in zip(nvme, cpu, rows, (16, 18)):
        assert state.device_bytes == on_cpu.device_bytes and on_disk == per_param * 7 * 10**9
        assert row[1:] == [memory.format_bytes(b) for b in (state.device_bytes, state.host_bytes, on_disk)]
    best = memory.recommend(
        7 * 10**9,
        7 * 10**9,
        device_bytes_available=80 * GiB,
        host_bytes_available=12 * GiB,
        gpus_per_node=8,
        wanted_micro_batch=8,
    )
    assert out[13] == "recommended: " + (
        text.setup_flags(best.stage, best.offload_optimizer, best.offload_param) or "plain Accelerate (no --zero)"
    )
    assert out[14] == f"reason: {best.reason}"


def test_plan_counts_the_task_model_without_building_it_in_the_kernel(shell, nexa, capsys):
    built = []

    def factory():
        built.append(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 20), torch.nn.Linear(20, 1))

    shell.user_ns["my_task"] = nexa_nb.Task(factory, linear_data(), loss_fn=mse)
    out = plan_output(shell, capsys, "my_task")
    assert built == []  # built on fake tensors, in a process of its own
    assert out[0] == "model: 121 parameters, largest layer 100 (counted from my_task's model)"
    assert out[1] == (
        "devices: 1 (no GPU: host memory is the device memory, 12.00 GiB available shared by "
        "1 process(es)); host: 12.00 GiB available"
    )
    assert out[2].startswith("activations: ")
    assert any(line.startswith("recommended: plain Accelerate (no --zero)") for line in out)


def test_plan_uses_the_gpus_found(shell, nexa, monkeypatch, capsys):
    monkeypatch.setattr("nexa_nb.commands.plan.probe", lambda: GPU_HOST)
    monkeypatch.setattr("nexa_nb.commands.status.probe", lambda: GPU_HOST)
    out = plan_output(shell, capsys, "--params 1B")
    assert out[1] == "devices: 2 (NVIDIA H100, 80.00 GiB each); host: 200.00 GiB available"
    assert out[-2] == "recommended: plain Accelerate (no --zero)"


@pytest.mark.parametrize(
    "line, problem",
    [
        ("--params abc", "argument --params: invalid count 'abc'"),
        ("--params 1M --gpus 0", "argument --gpus: invalid value '0'"),
        ("--params 1M --gpu-mem -1", "argument --gpu-mem: invalid value '-1'"),
        (
            "--params 100 --largest-layer 200",
            "the largest layer (200) cannot hold more parameters than the model (100)",
        ),
        ("nothing_here", "there is no variable 'nothing_here'"),
    ],
)
def test_plan_bad_input(shell, nexa, line, problem):
    message = usage_error(shell, "nexa_plan", line)
    assert problem in message and "\n" not in message


# --- %nexa_status -----------------------------------------------------------------------------


def test_status(shell, nexa, monkeypatch, capsys):
    shell.run_line_magic("nexa_config", "--zero 2 --procs 2 --grad-accum 2")
    plan = nexa_nb.make_plan(nexa.session.resolve())
    result = api.TrainResult(
        history=[{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}],
        final_loss=0.5,
        plan=plan,
        checkpoint_dir=None,
        distributed_type="DEEPSPEED",
        num_processes=2,
    )
    monkeypatch.setattr(api, "_last", result)
    capsys.readouterr()
    shell.run_line_magic("nexa_status", "")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "devices: no GPU (CPU processes); host: 2 cores, 16.00 GiB (12.00 GiB available)"
    assert out[1] == "DeepSpeed ZeRO-2, fp32, 2 x CPU (DEEPSPEED)"
    assert out[2].startswith("batch: micro 8 x accumulation 2 x 2 procs")
    versions = [
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "accelerate", "deepspeed", "transformers", "peft")
    ]
    assert all(v in out[3] for v in versions)
    assert out[4] == "last run: completed, 2 steps, final loss 0.5000, DEEPSPEED x 2"
    shell.run_line_magic("nexa_status", "--traceback")
    assert capsys.readouterr().out == "no worker has failed in this kernel\n"


# --- %nexa_export -----------------------------------------------------------------------------


def test_export_writes_the_script_and_prints_the_command(shell, nexa, tmp_path, capsys):
    shell.run_line_magic("nexa_config", "--procs 2")
    capsys.readouterr()
    shell.run_line_magic("nexa_export", "train.py --zero 2 --bf16")
    out = capsys.readouterr().out
    assert f"{sys.executable} -m accelerate.commands.launch --config_file train.accelerate.yaml train.py" in out
    assert (tmp_path / "train.py").is_file()
    saved = yaml.safe_load((tmp_path / "train.accelerate.yaml").read_text())
    assert (saved["distributed_type"], saved["num_processes"]) == ("DEEPSPEED", 2)
    assert saved["deepspeed_config"]["zero_stage"] == 2


def test_export_refuses_an_auto_micro_batch_and_writes_nothing(shell, nexa, tmp_path):
    """The sizes are tried by a run from the notebook; a script would train at whatever it fell back to."""
    message = usage_error(shell, "nexa_export", "train.py --batch-size auto")
    assert message == (
        "batch_size: --batch-size auto tries micro-batches before a run from the notebook, and an exported "
        "script trains without that search. Fix: pass a number to --batch-size (a run here with --batch-size "
        "auto shows one that fits)."
    )
    assert list(tmp_path.iterdir()) == []


# --- real runs --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback of fp16")
def test_zero3_fp16_in_two_cpu_processes(shell, nexa, capsys):
    result = shell.run_cell("res = %nexa_train --zero 3 --fp16 --procs 2 --max-steps 6 --batch-size 32 --lr 0.05")
    assert result.error_in_exec is None
    out = capsys.readouterr().out
    assert out.startswith("DeepSpeed ZeRO-3, bf16, 2 x CPU (DEEPSPEED)\n")
    assert out.count("fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead") == 1
    res = shell.user_ns["res"]
    assert (res.distributed_type, res.num_processes, res.status) == ("DEEPSPEED", 2, "completed")
    assert len(res.losses) == 6 and res.losses[-1] < 0.8 * res.losses[0]
    assert nexa_nb.last_result() is res


@pytest.mark.slow
def test_checkpoint_then_resume_latest(shell, nexa, capsys):
    first = shell.run_line_magic("nexa_train", "--max-steps 2 --ckpt-dir ckpt --batch-size 16")
    assert Path(first.checkpoint_dir).name == "step-0000002"
    second = shell.run_line_magic("nexa_train", "--max-steps 3 --ckpt-dir ckpt --batch-size 16 --resume latest")
    assert [h["step"] for h in second.history] == [1, 2, 3]
    assert "resuming at step 2" in capsys.readouterr().out


@pytest.mark.slow
def test_worker_failure_names_the_rank_and_keeps_the_traceback(shell, nexa, capsys):
    shell.user_ns["my_task"] = linear_task(loss_fn=boom)
    message = usage_error(shell, "nexa_train", "my_task --procs 2 --max-steps 2")
    assert re.fullmatch(
        r"rank [01]: RuntimeError: boom in the loss "
        r"\(the worker's traceback: %nexa_status --traceback\)",
        message,
    )
    capsys.readouterr()
    shell.run_line_magic("nexa_status", "--traceback")
    worker_traceback = capsys.readouterr().out
    assert worker_traceback.startswith("Traceback") and "RuntimeError: boom in the loss" in worker_traceback
