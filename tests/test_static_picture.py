"""What a saved notebook shows where no kernel or widget state is at hand (GitHub, nbviewer,
nbconvert): the static SVG picture and the summary that replace the live dashboard.

The notebook runs in a real kernel (nbclient), is saved, and is converted to HTML by this
environment's `jupyter nbconvert`.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from browser.lab import training_notebook, write_kernelspec
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_saved_notebook_shows_the_run_without_widgets(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = write_kernelspec(tmp_path / "jupyter")
    nb = training_notebook("res = %nexa_train --max-steps 5")
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)

    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    outputs = saved.cells[-1].outputs
    pictures = [o["data"]["image/svg+xml"] for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 1 and 'class="nexa-run"' in pictures[0]
    assert 'class="nexa-status" data-status="completed"' in pictures[0]
    summaries = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(summaries) == 1 and summaries[0].startswith("Trained 5 steps with single process")
    # No output is a widget view: the picture needs no widget state. (nbclient still saves the
    # state of every widget model it saw, closed ones included, in metadata.widgets.)
    assert not any(WIDGET_VIEW in o.get("data", {}) for cell in saved.cells for o in cell.get("outputs", []))

    jupyter = Path(sys.executable).with_name("jupyter")
    subprocess.run([str(jupyter), "nbconvert", "--to", "html", str(path)], check=True, capture_output=True, timeout=300)
    html = path.with_suffix(".html").read_text()
    # nbconvert's lab template embeds an SVG output as <img src="data:image/svg+xml;base64,...">.
    embedded = [
        base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)
    ]
    assert embedded == pictures
    assert '<polyline class="nexa-loss" data-rank="0" data-points="5"' in embedded[0]
    assert ">completed 5 steps</text>" in embedded[0]
    assert "<p>Trained 5 steps with single process" in html
    assert f'<script type="{WIDGET_VIEW}">' not in html  # no widget for the page to draw
