"""Detached runs (`train(..., detach=True)`, ``%nexa_train --detach``): they train in a process of
their own, outlive the kernel that started them, are followed from another kernel through their
record, and stop with ``%nexa_stop`` keeping their last checkpoint."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from IPython.core.error import UsageError
from nbclient import NotebookClient

import nexa_nb
from nexa_nb import events as ev
from nexa_nb import runs
from nexa_nb.errors import TrainingError
from tests.conftest import regression_task


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def slow_task(seconds: float = 0.1, n: int = 512):
    task = regression_task(n=n)
    base = task.loss_fn

    def slow(out, batch):
        time.sleep(seconds)
        return base(out, batch)

    task.loss_fn = slow
    return task


def usage_error(shell, magic: str, line: str) -> str:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic(magic, line)
    return str(caught.value)


# --- bad input: one line, nothing started ------------------------------------------------------


def test_detach_with_a_task_that_cannot_be_pickled_names_the_object(shell, in_tmp):
    task = regression_task()
    lock = threading.Lock()
    base = task.loss_fn

    def locked_loss(out, batch):
        with lock:
            return base(out, batch)

    task.loss_fn = locked_loss
    shell.user_ns["task"] = task
    message = usage_error(shell, "nexa_train", "--detach --max-steps 2")
    assert message.startswith("cannot detach the run: task.loss_fn.lock is a lock, which cannot be saved"), message
    assert "\n" not in message and not (in_tmp / "nexa_runs").exists()


def test_stop_a_run_that_has_finished_is_one_line(shell, in_tmp):
    result = nexa_nb.train(regression_task(), sinks=[], max_steps=2)
    message = usage_error(shell, "nexa_stop", Path(result.run_dir).name)
    assert message == f"run {Path(result.run_dir).name} has ended (completed); there is nothing to stop"


def test_stop_a_run_that_does_not_exist_is_one_line(shell, in_tmp):
    assert usage_error(shell, "nexa_stop", "nope").startswith("no run record named 'nope'")


# --- detached runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_detached_run_gives_the_in_kernel_losses_and_stops_keeping_its_checkpoint(in_tmp):
    options = {"procs": 2, "max_steps": 6, "lr": 0.02, "seed": 5}
    handle = nexa_nb.train(regression_task(), detach=True, **options)
    assert isinstance(handle, nexa_nb.DetachedRun) and runs.Run(handle.run_dir).info()["pid"] == handle.pid
    detached = handle.result()
    here = nexa_nb.train(regression_task(), sinks=[], **options)
    assert detached.status == "completed" and detached.losses == here.losses

    ckpt = in_tmp / "ckpt"
    long = nexa_nb.train(slow_task(), detach=True, procs=2, max_steps=500, ckpt_dir=str(ckpt), ckpt_every=3)
    run = runs.Run(long.run_dir)
    while not any(isinstance(e, ev.CheckpointSaved) for e in run.events()):
        assert run.status() == "running"
        time.sleep(0.1)
    nexa_nb.stop(long.name)
    stopped = long.result()
    assert stopped.status == "interrupted" and Path(stopped.checkpoint_dir).parent == ckpt
    deadline = time.monotonic() + 30  # the process ends after writing the result
    while runs.process_alive(long.pid):
        assert time.monotonic() < deadline, "the detached process did not end"
        time.sleep(0.2)
    resumed = nexa_nb.train(slow_task(0), sinks=[], procs=2, max_steps=12, ckpt_dir=str(ckpt), resume="latest")
    started = next(e for e in runs.Run(resumed.run_dir).events() if isinstance(e, ev.RunStarted))
    assert started.start_step == int(stopped.checkpoint_dir.rsplit("-", 1)[1]) > 0
    assert resumed.status == "completed" and resumed.history[-1]["step"] == 12
    with pytest.raises(TrainingError, match="has ended"):
        nexa_nb.stop(long.name)


TASK_CELL = """\
import time
import torch
import nexa_nb

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
y = x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]])

def slow_mse(outputs, batch):
    time.sleep(0.25)
    return torch.nn.functional.mse_loss(outputs.float(), batch[-1].float())

task = nexa_nb.Task(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                    list(zip(x, y)), loss_fn=slow_mse)
"""
FLAGS = "--procs 2 --max-steps 24 --batch-size 8 --lr 0.05 --seed 7"


def kernelspec(folder: Path) -> str:
    spec = folder / "kernels" / "nexa-detach"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "nexa", "language": "python"}))
    return "nexa-detach"


def run_notebook(cells: list[str], kernel: str, cwd: Path) -> list:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb.cells  # the kernel is shut down when execute returns


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


@pytest.mark.slow
def test_a_detached_run_outlives_its_kernel_and_another_kernel_attaches(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = kernelspec(tmp_path / "jupyter")
    record = tmp_path / "detached-run"
    first = run_notebook(
        ["%load_ext nexa_nb", TASK_CELL, f"h = %nexa_train {FLAGS} --detach --run-dir {record}", "print(h.pid)"],
        kernel,
        tmp_path,
    )
    assert "detached: detached-run trains in process" in stdout(first[2])
    run = runs.Run(record)
    assert run.result() is None and run.status() == "running"  # its kernel is gone, the run goes on
    assert runs.process_alive(int(stdout(first[3])))

    second = run_notebook(
        [
            "%load_ext nexa_nb",
            TASK_CELL,
            f"res = %nexa_attach {record}",
            f"%config NexaMagics.dashboard = False\nref = %nexa_train {FLAGS}",
            "import json\nprint(json.dumps([res.status, res.losses == ref.losses, len(res.losses)]))",
        ],
        kernel,
        tmp_path,
    )
    assert json.loads(stdout(second[4])) == ["completed", True, 24]
    pictures = [o["data"]["image/svg+xml"] for o in second[2].outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 1 and 'data-status="completed"' in pictures[0]
