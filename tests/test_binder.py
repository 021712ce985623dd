"""Binder's files build an environment that runs the quickstart.

A fresh virtual environment is built from exactly what Binder (repo2docker) reads:
``pip install -r binder/requirements.txt``, then ``binder/postBuild`` run in the repository's
root. Then ``notebooks/00_quickstart.ipynb`` runs top to bottom in it, with that environment's
``jupyter nbconvert --execute``, beside a copy of ``notebooks/nexa_tutorials`` (the helpers it imports
from its folder, which Binder's JupyterLab makes the kernel's working directory).

PyTorch's CPU index, which binder/requirements.txt names, may be out of reach (it is on the
development machines, which have the CPU wheel locally instead): pip then warns and goes on.
``--retries 1`` keeps each of those failed look-ups short; pip's cache stays on, so a second
run reuses what the first downloaded. DeepSpeed's compiled ops go to a temporary folder, so
that the builds of this environment never replace those of the environment running the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"


def run(command, **kwargs):
    """Run a command; on failure, the assertion shows the end of its output."""
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout[-6000:]}"
    return done.stdout


def test_binder_files_build_an_environment_that_runs_the_quickstart(tmp_path):
    assert os.access(BINDER / "postBuild", os.X_OK), "repo2docker runs postBuild only when it is executable"
    started = time.monotonic()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # postBuild's `python`, DeepSpeed's `ninja`
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
        JUPYTER_PATH=str(venv / "share" / "jupyter"),  # its own "python3" kernel before any user-wide one
        PYTHONNOUSERSITE="1",
    )
    pip_options = ["--retries", "1", "--timeout", "60", "--disable-pip-version-check"]
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", *pip_options, "-r", str(BINDER / "requirements.txt")],
        cwd=ROOT,
        env=env,
    )
    run(["bash", str(BINDER / "postBuild")], cwd=ROOT, env=env)
    installed = time.monotonic()

    versions = json.loads(
        run(
            [
                str(bin_dir / "python"),
                "-c",
                "import json, torch, nexa_nb, sys; print(json.dumps([torch.__version__, "
                "torch.version.cuda, nexa_nb.__file__, sys.executable]))",
            ],
            env=env,
        )
    )
    assert versions[0].endswith("+cpu") and versions[1] is None, versions  # the CPU build, not CUDA's
    assert Path(versions[2]).is_relative_to(ROOT), versions  # this checkout, editable
    assert Path(versions[3]).parent == bin_dir, versions

    # Outside the repository, so that its checkpoint folder cannot meet another run's; with the
    # tutorials' helpers beside it, as in notebooks/, where the kernel imports them from.
    notebook = tmp_path / "00_quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", notebook)
    shutil.copytree(
        ROOT / "notebooks" / "nexa_tutorials", tmp_path / "nexa_tutorials", ignore=shutil.ignore_patterns("__pycache__")
    )
    run(
        [
            str(bin_dir / "jupyter"),
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--inplace",
            "--ExecutePreprocessor.timeout=1200",
            "--ExecutePreprocessor.kernel_name=python3",
            str(notebook),
        ],
        cwd=tmp_path,
        env=env,
    )
    executed = time.monotonic()

    cells = nbformat.read(notebook, as_version=4).cells
    outputs = [output for cell in cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "TrainResult(completed, 40 steps" in text and "TrainResult(completed, 80 steps" in text
    assert sum("image/svg+xml" in o.get("data", {}) for o in outputs) == 2  # the dashboard's two pictures
    assert not (tmp_path / "ckpt").exists()  # the notebook cleans up after itself
    print(
        f"binder environment: installed in {installed - started:.0f} s, quickstart ran in {executed - installed:.0f} s"
    )
