"""Shared test fixtures: small, learnable tasks built in code (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run several CPU worker processes on a 2-core machine: one thread each keeps them fair.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# This environment's tools first, for the tests and every process they start: DeepSpeed
# compiles its ops with the first `ninja` on PATH, and a different ninja rebuilds them.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def regression_task(
    n: int = 256, dim: int = 8, hidden: int = 16, seed: int = 0, eval_n: int = 0, metrics=None, dropout: float = 0.0
):
    """y = Xw + noise, learned by a small MLP (with dropout if asked); the model is a factory,
    built inside each worker."""
    import torch

    import nexa_nb

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + eval_n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + 0.01 * torch.randn(n + eval_n, 1, generator=g)
    pairs = list(zip(x, y))

    def model():
        layers = [torch.nn.Linear(dim, hidden), torch.nn.Tanh()]
        layers += [torch.nn.Dropout(dropout)] if dropout else []
        return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 1))

    def loss_fn(out, batch):
        return torch.nn.functional.mse_loss(out, batch[-1])

    return nexa_nb.Task(
        model, pairs[:n], eval_data=pairs[n:] or None, loss_fn=loss_fn, metrics=metrics, name="regression"
    )


def weights_dump_metric(folder):
    """A Task metric that writes each rank's full weights to `folder`: how a test sees every rank."""

    def metric(model, batches):
        import torch

        rank = int(os.environ.get("RANK", "0"))
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(folder, f"rank{rank}.pt"))
        return {}

    return metric


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed run's `TrainingError` says what failed in one line; the report adds the worker's
    own traceback, which says where."""
    outcome = yield
    error = call.excinfo.value if call.excinfo else None
    worker_traceback = getattr(error, "worker_traceback", "")
    if worker_traceback:
        outcome.get_result().sections.append(("worker traceback", worker_traceback))


@pytest.fixture
def quiet():
    """No console output from runs: a recording sink instead."""
    from nexa_nb.events import RecordingSink

    return RecordingSink()


@pytest.fixture(scope="module")
def shell():
    """A real IPython shell (the process's one) with nexa_nb's magics loaded, as `%load_ext nexa_nb` does."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nexa_nb")
    return shell


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A Jupyter kernelspec for this interpreter, found through JUPYTER_PATH: real kernels that
    run the code under test, whatever kernels the machine has installed."""
    import json

    spec = tmp_path / "jupyter" / "kernels" / "nexa-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nexa_nb test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "nexa-test"
