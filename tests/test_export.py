"""Exported scripts under real `accelerate launch`: the same losses as the notebook run."""

from __future__ import annotations

import inspect
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import nexa_nb
from nexa_nb import Task, TrainingError, resolve_config
from nexa_nb.export import accelerate_yaml, export_script, save_accelerate_config

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
OPTIONS = {"batch_size": 4, "target_batch": 16, "max_steps": 6, "seed": 3, "procs": 2}  # accumulation 2
TIMEOUT = 240


# --- the task, defined in this module -------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def make_model():
    return Regressor()


def loss_fn(outputs, batch):
    return nn.functional.mse_loss(outputs, batch[1])


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [(x[i], y[i]) for i in range(64)]


TRAIN_DATA = regression_data()


def make_task(data=TRAIN_DATA):
    return Task(make_model, data, loss_fn=loss_fn, name="regression")


# --- helpers ----------------------------------------------------------------------------------


def subprocess_env(with_tests: bool = True) -> dict[str, str]:
    """This environment, with this module importable if asked, and the venv's tools on PATH.

    The venv goes last: `accelerate test` needs its accelerate-launch, but a different ninja
    from the one the notebook runs used would rebuild DeepSpeed's JIT ops (about a minute).
    """
    paths = [str(HERE.parent)] + ([str(HERE)] if with_tests else [])
    return dict(os.environ, PATH=f"{os.environ.get('PATH', '')}{os.pathsep}{BIN}", PYTHONPATH=os.pathsep.join(paths))


def accelerate(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "accelerate"), *args],
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"accelerate {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def result(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["losses"] = [h["loss"] for h in data["history"]]
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notebook_losses():
    return nexa_nb.train(make_task(), sinks=[], **OPTIONS).losses


@pytest.fixture(scope="module")
def notebook_zero2_losses():
    return nexa_nb.train(make_task(), sinks=[], zero=2, **OPTIONS).losses


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The module-defined task, exported for 2 CPU processes."""
    folder = tmp_path_factory.mktemp("export")
    return folder, export_script(make_task(), resolve_config(arguments=OPTIONS), folder / "train.py")


# --- a module-defined task --------------------------------------------------------------------


def test_module_task_is_imported_by_reference(exported):
    folder, files = exported
    assert files.task_file is None
    assert sorted(p.name for p in folder.iterdir()) == ["train.accelerate.yaml", "train.py"]
    script = Path(files.script).read_text()
    assert "import test_export" in script and "model=test_export.make_model" in script
    assert "train_data=test_export.TRAIN_DATA" in script
    assert "by reference, imported as test_export.loss_fn" in files.explanation
    assert files.command == (
        f"{sys.executable} -m accelerate.commands.launch --config_file {folder / 'train.accelerate.yaml'} "
        f"{folder / 'train.py'}"
    )
    assert "--num_machines 2 --num_processes 4 --machine_rank R --main_process_ip IP" in files.explanation


@pytest.mark.slow
def test_the_printed_command_runs_as_printed_without_the_environment_on_path(exported, notebook_losses):
    """A kernel started without activating its environment has no `accelerate` on PATH: the
    printed command names the kernel's own Python, so it runs from a shell whose PATH lacks it."""
    folder, files = exported
    env = {**subprocess_env(), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [*shlex.split(files.command), "--history-out", "printed.json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(folder / "printed.json")["losses"] == pytest.approx(notebook_losses, abs=1e-6)


@pytest.mark.slow
def test_two_processes_match_the_notebook(exported, notebook_losses):
    folder, files = exported
    accelerate(
        "launch",
        "--config_file",
        files.accelerate_config,
        "--num_processes",
        "2",
        files.script,
        "--history-out",
        "two.json",
        cwd=folder,
    )
    run = result(folder / "two.json")
    assert (run["distributed_type"], run["num_processes"]) == ("MULTI_CPU", 2)
    assert run["losses"] == pytest.approx(notebook_losses, abs=1e-6)


@pytest.mark.slow
def test_two_machines_on_loopback_match_the_notebook(exported, notebook_losses):
    folder, files = exported
    port = str(free_port())
    machines = []
    for rank in (0, 1):
        command = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            files.accelerate_config,
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            files.script,
            "--history-out",
            f"machine{rank}.json",
        ]
        machines.append(
            subprocess.Popen(
                command, cwd=folder, env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    try:
        outputs = [m.communicate(timeout=TIMEOUT)[0] for m in machines]
    finally:
        for m in machines:
            m.kill()
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert not (folder / "machine1.json").exists()  # only the world's rank 0 writes
    run = result(folder / "machine0.json")
    assert (run["distributed_type"], run["num_processes"]) == ("MULTI_CPU", 2)
    assert run["losses"] == pytest.approx(notebook_losses, abs=1e-6)


# --- a task defined in a notebook's __main__ ---------------------------------------------------

NOTEBOOK = """\
import json
import torch
from torch import nn
import nexa_nb
from nexa_nb import Task
from nexa_nb.export import export_script

{definitions}
task = make_task()
files = export_script(task, nexa_nb.resolve_config(arguments={options!r}), "train.py", task_var="task")
print(json.dumps({{"task_file": files.task_file, "explanation": files.explanation}}))
"""


@pytest.mark.slow
def test_main_task_travels_by_value_and_matches_the_notebook(tmp_path, notebook_losses):
    """The notebook's own cells define the same task; the script then needs nothing from them."""
    definitions = "\n\n".join(inspect.getsource(obj) for obj in (Regressor, make_model, loss_fn, regression_data))
    definitions += "\n\nTRAIN_DATA = regression_data()\n\n\n" + inspect.getsource(make_task)
    (tmp_path / "notebook.py").write_text(NOTEBOOK.format(definitions=definitions, options=OPTIONS))
    proc = subprocess.run(
        [sys.executable, "notebook.py"],
        cwd=tmp_path,
        env=subprocess_env(with_tests=False),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.splitlines()[-1])
    assert files["task_file"] == "train.task.pkl"
    assert "model: by value, make_model (defined in __main__)" in files["explanation"]
    assert "load it only from a trusted source" in files["explanation"]
    assert "test_export" not in (tmp_path / "train.py").read_text()

    accelerate(
        "launch",
        "--config_file",
        "train.accelerate.yaml",
        "--num_processes",
        "2",
        "train.py",
        "--history-out",
        "run.json",
        cwd=tmp_path,
        env=subprocess_env(with_tests=False),
    )
    assert result(tmp_path / "run.json")["losses"] == pytest.approx(notebook_losses, abs=1e-6)


# --- DeepSpeed -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_zero2_export_matches_the_notebook(tmp_path, notebook_zero2_losses):
    files = export_script(
        make_task(regression_data()), resolve_config(arguments={**OPTIONS, "zero": 2}), tmp_path / "train.py"
    )
    assert files.task_file == str(tmp_path / "train.task.pkl")  # the data is not a module global: by value
    config = yaml.safe_load(Path(files.accelerate_config).read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert config["deepspeed_config"]["zero_stage"] == 2 and config["deepspeed_config"]["zero3_init_flag"] is False

    accelerate(
        "launch", "--config_file", files.accelerate_config, files.script, "--history-out", "run.json", cwd=tmp_path
    )
    run = result(tmp_path / "run.json")
    assert (run["distributed_type"], run["num_processes"]) == ("DEEPSPEED", 2)
    assert run["losses"] == pytest.approx(notebook_zero2_losses, abs=1e-6)


# --- accelerate configs ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("procs, planned", [(1, "NO"), (2, "MULTI_CPU")])
def test_saved_config_passes_accelerate_test(tmp_path, procs, planned):
    config = resolve_config(arguments={"procs": procs})
    path = save_accelerate_config(config, tmp_path / "accelerate.yaml")
    assert Path(path).read_text() == accelerate_yaml(config)
    assert nexa_nb.make_plan(resolve_config(config_file=path)).distributed_type == planned
    # accelerate's own test script builds a plain Accelerator(); on a CPU host the workers only
    # join one process group when told to use the CPU, as the YAML's header says.
    proc = accelerate("test", "--config_file", path, cwd=tmp_path, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"})
    assert "Test is a success" in proc.stdout
    assert proc.stdout.count(f"Num processes: {procs}") == procs


def test_accelerate_yaml_for_several_machines():
    config = yaml.safe_load(accelerate_yaml(resolve_config(arguments={"procs": 2, "zero": 3}), num_machines=3))
    assert (config["num_machines"], config["num_processes"], config["machine_rank"]) == (3, 6, 0)
    assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun, not pdsh


# --- what must not be written ----------------------------------------------------------------------


class OpenFileData:
    def __init__(self, path):
        self.handle = open(path)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.zeros(4)


def test_unserialisable_task_fails_in_one_line_and_writes_nothing(tmp_path):
    lock = threading.Lock()

    def locked_loss(outputs, batch):
        with lock:
            return loss_fn(outputs, batch)

    cases = [
        (Task(make_model, (sample for sample in TRAIN_DATA)), "my_task.train_data is a generator"),
        (Task(make_model, TRAIN_DATA, loss_fn=locked_loss), "my_task.loss_fn.lock is a lock"),
        (Task(make_model, OpenFileData(__file__)), "my_task.train_data.handle is a TextIOWrapper"),
    ]
    out = tmp_path / "out"
    for task, culprit in cases:
        with pytest.raises(TrainingError) as error:
            export_script(task, resolve_config(), out / "train.py", task_var="my_task")
        message = str(error.value)
        assert "\n" not in message and culprit in message
        assert "define it in a module" in message and "list or a torch Dataset" in message
        assert not out.exists()
    cases[2][0].train_data.handle.close()


def test_script_must_not_shadow_a_module(tmp_path):
    with pytest.raises(TrainingError, match="a script named test_export.py would be imported instead of the module"):
        export_script(make_task(), resolve_config(), tmp_path / "test_export.py")
    assert not any(tmp_path.iterdir())


def test_environment_secrets_are_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret123")
    monkeypatch.setenv("HF_TOKEN", "hf_exporttoken42")
    files = export_script(
        make_task(regression_data()), resolve_config(arguments={**OPTIONS, "zero": 2}), tmp_path / "ok" / "train.py"
    )
    written = list((tmp_path / "ok").iterdir())
    assert {p.name for p in written} == {"train.py", "train.task.pkl", "train.accelerate.yaml"}
    for path in written:
        assert b"secret123" not in path.read_bytes() and b"hf_exporttoken42" not in path.read_bytes()
    assert "set tracker tokens and the like on each machine" in files.explanation

    token = os.environ["HF_TOKEN"]

    def loss_with_token(outputs, batch):  # carries the token's value: refused
        assert token
        return loss_fn(outputs, batch)

    with pytest.raises(TrainingError, match=r"the value of \$HF_TOKEN would be written into train.task.pkl"):
        export_script(
            Task(make_model, TRAIN_DATA, loss_fn=loss_with_token), resolve_config(), tmp_path / "refused" / "train.py"
        )
    assert not (tmp_path / "refused").exists()
