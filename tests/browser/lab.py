"""Helpers for the notebook tests: a kernelspec for this interpreter, the training notebook,
JupyterLab on 127.0.0.1 with a token, and headless Chromium driven by playwright."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import psutil

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (apt-get install chromium)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KERNEL = "nexa-test"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

TASK_CELL = """\
import time
import torch
import nexa_nb

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g)
y = x @ torch.randn(8, 1, generator=g)

def model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

def slow_mse(outputs, batch):
    time.sleep(SLEEP)  # slow enough to watch the live dashboard
    return torch.nn.functional.mse_loss(outputs, batch[-1])

task = nexa_nb.Task(model, list(zip(x, y)), loss_fn=slow_mse)
"""


def write_kernelspec(jupyter_path: Path) -> str:
    """A kernelspec running this interpreter, found through JUPYTER_PATH=`jupyter_path`."""
    spec = jupyter_path / "kernels" / KERNEL
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
    return KERNEL


def training_notebook(train_line: str, sleep: float = 0.0, more: tuple[str, ...] = ()):
    """The notebook: load the magics, refresh the dashboard often, define the task, train."""
    cells = [
        "%load_ext nexa_nb",
        "%config NexaMagics.refresh_interval = 0.2",
        TASK_CELL.replace("SLEEP", repr(sleep)),
        train_line,
        *more,
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "nexa_nb test", "language": "python"}
    return nb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`jupyter lab` as a subprocess: 127.0.0.1 only, a random port and token, every
    Jupyter folder under `home` (no user settings, no news or update checks)."""

    def __init__(self, home: Path):
        self.home = home
        self.root = home / "root"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log = home / "jupyterlab.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        self.root.mkdir(parents=True)
        jupyter_path = self.home / "jupyter"
        write_kernelspec(jupyter_path)
        # No "get notified about Jupyter news?" toast over the notebook, and no request for news.
        settings = self.home / "settings" / "@jupyterlab" / "apputils-extension"
        notification = settings / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(
            os.environ,
            JUPYTER_PATH=str(jupyter_path),
            JUPYTER_CONFIG_DIR=str(self.home / "config"),
            JUPYTER_DATA_DIR=str(self.home / "data"),
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            IPYTHONDIR=str(self.home / "ipython"),
        )
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.password=",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.allow_root=True",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.extension_manager=readonly",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabApp.workspaces_dir={self.home / 'workspaces'}",
            f"--LabApp.user_settings_dir={self.home / 'settings'}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands from the test
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with self.api("GET", "/api/status") as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, method: str, path: str):
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        return urllib.request.urlopen(request, timeout=5)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> list[str]:
        """Shut the server down (kernels first) and wait for every process it started.
        Returns the processes that had to be killed (empty when the shutdown was clean)."""
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        try:
            self.api("POST", "/api/shutdown").close()
        except OSError:
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=timeout)
        left = []
        for process in alive:
            try:
                left.append(" ".join(process.cmdline()) or process.name())
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process = None
        return left


@contextmanager
def chromium(playwright):
    """Headless Debian Chromium; closed on exit."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
    try:
        yield browser
    finally:
        browser.close()


def notebook(*cells: str):
    """A notebook of code cells with these sources, on this interpreter's kernelspec."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "nexa_nb test", "language": "python"}
    return nb


KERNEL_IDLE_JS = """
() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && kernel.connectionStatus === 'connected';
}
"""

PROMPTS_JS = "() => [...document.querySelectorAll('.jp-Notebook .jp-InputPrompt')].map((p) => p.textContent.trim())"


def run_all_cells(page, timeout: float = 120) -> None:
    """Run every cell of the open notebook once its kernel is idle; return when the first cell
    is queued, or raise AssertionError.

    The command is sent again if no cell was queued: just after the page loads it can reach
    the notebook before JupyterLab tracks it as the current one, and then does nothing."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_function(KERNEL_IDLE_JS, timeout=timeout * 1000)
    for _ in range(3):
        # Not awaited: the command's promise resolves only when every cell has run.
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function(f"() => ({PROMPTS_JS})().some((p) => /[*0-9]/.test(p))", timeout=15_000)
            return
        except PlaywrightTimeout:
            pass
    raise AssertionError(f"run all cells: no cell was queued; prompts {page.evaluate(PROMPTS_JS)}")
