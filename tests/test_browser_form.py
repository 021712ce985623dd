"""The configuration form (`%nexa_config --widget`) in a real browser: JupyterLab in headless
Chromium shows the form; a user picks ZeRO stages and offload devices from its dropdowns and
sees the plan and the `%nexa_train` line follow, sees an impossible combination refused with
the flags' error message and Train disabled, then sets two processes and a step limit, clicks
Train, and watches the run's live dashboard appear under the form and complete.

The controls are found as a user finds them, by the labels the form shows, and through
ipywidgets' DOM classes. Screenshots go to tests/artifacts/ (form-error.png, form-training.png,
form-trained.png).
"""

from __future__ import annotations

import re
import time

import nbformat
import pytest
from browser.lab import ARTIFACTS, CHROMIUM, TASK_CELL, JupyterLab, chromium, notebook, run_all_cells
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} (make browser-deps)"),
]

STEPS = 20
FORM_CELL = 3  # index of the `%nexa_config --widget` cell
CHANGE = 30_000  # ms for the kernel to answer a change of the form (two shared cores: it can be slow)

# The run that Train starts, as the form cell's output widget shows it: the live dashboard
# (its HTML is in the DOM) and, once the run ends, the static picture (an <img> holding the
# SVG as a data: URL, parsed here the same way).
RUN_JS = """
(index) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  const output = cell && cell.querySelector('.widget-output');
  if (!output) return null;
  const read = (root) => {
    const progress = root.querySelector('.nexa-progress');
    const status = root.querySelector('.nexa-status');
    return {
      points: Object.fromEntries([...root.querySelectorAll('polyline.nexa-loss')]
        .map((p) => [p.getAttribute('data-rank'), Number(p.getAttribute('data-points'))])),
      progress: progress && [Number(progress.dataset.step), Number(progress.dataset.total)],
      status: status && [status.getAttribute('data-status'), status.textContent],
    };
  };
  const img = output.querySelector('img[src^="data:image/svg+xml"]');
  const svg = img && decodeURIComponent(img.src.slice(img.src.indexOf(',') + 1));
  return {
    live: output.querySelector('.nexa-progress') ? read(output) : null,
    final: svg && read(new DOMParser().parseFromString(svg, 'image/svg+xml')),
  };
}
"""


class Form:
    """The form in its notebook cell, located by what it shows."""

    def __init__(self, cell):
        self.cell = cell
        self.page = cell.page
        self.magic = self.control(".widget-text", "copy as magic").locator("input")
        self.train = cell.locator(".jupyter-button").filter(has_text=re.compile(r"^\s*Train\s*$"))
        # The plan: the view after the bold "plan" heading.
        self.plan = cell.locator('.widget-html:has(b:text-is("plan")) + .widget-html')
        # The refusal, whose message says how to fix the flags.
        self.error = cell.locator(".widget-html").filter(has_text=re.compile(r"\bFix: "))

    def control(self, kind: str, label: str):
        """The control of DOM class `kind` whose description reads `label`."""
        description = self.page.locator(".widget-label").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
        return self.cell.locator(kind).filter(has=description)

    def select(self, label: str, option: str) -> None:
        self.control(".widget-dropdown", label).locator("select").select_option(label=option)

    def type(self, label: str, text: str) -> None:
        """Type into a text or number field and press Enter, which a number field needs to send its value."""
        field = self.control(".widget-text", label).locator("input")
        field.fill(text)
        field.press("Enter")


def check_form(form: Form) -> None:
    # 1. The form renders with nexa_nb's defaults (or a cell fails: then say why at once).
    zero = form.control(".widget-dropdown", "ZeRO stage").locator("select")
    failed = form.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    failed = failed.filter(has_text=re.compile(r"Error|Traceback"))
    expect(zero.or_(failed).first).to_be_visible(timeout=120_000)
    assert not failed.count(), f"a cell of the notebook failed:\n{failed.first.inner_text()}"
    expect(zero).to_have_value("none", timeout=CHANGE)
    expect(form.magic).to_have_value("%nexa_train", timeout=CHANGE)
    expect(form.train).to_be_visible(timeout=CHANGE)
    expect(form.train).to_be_enabled(timeout=CHANGE)
    expect(form.plan).to_contain_text("single process", timeout=CHANGE)
    expect(form.error).to_have_count(0, timeout=CHANGE)

    # 2. A ZeRO stage changes the plan and the line.
    form.select("ZeRO stage", "3")
    expect(form.magic).to_have_value("%nexa_train --zero 3", timeout=CHANGE)
    expect(form.plan).to_contain_text("ZeRO-3", timeout=CHANGE)
    expect(form.plan).to_contain_text("DEEPSPEED", timeout=CHANGE)
    form.select("parameter offload", "cpu")
    expect(form.magic).to_have_value("%nexa_train --zero 3 --offload-param cpu", timeout=CHANGE)
    expect(form.plan).to_contain_text("offload params->cpu", timeout=CHANGE)
    expect(form.train).to_be_enabled(timeout=CHANGE)

    # 3. Impossible combinations: the flags' message, nothing planned, Train disabled.
    form.select("ZeRO stage", "2")
    expect(form.magic).to_have_value("%nexa_train --zero 2 --offload-param cpu", timeout=CHANGE)
    expect(form.error).to_have_count(1, timeout=CHANGE)
    expect(form.error).to_contain_text("parameter offload", timeout=CHANGE)
    expect(form.error).to_contain_text("--zero 3", timeout=CHANGE)
    expect(form.train).to_be_disabled(timeout=CHANGE)
    expect(form.plan).not_to_contain_text("ZeRO", timeout=CHANGE)
    form.cell.screenshot(path=ARTIFACTS / "form-error.png")
    form.select("parameter offload", "none")
    expect(form.error).to_have_count(0, timeout=CHANGE)
    expect(form.plan).to_contain_text("ZeRO-2", timeout=CHANGE)
    expect(form.train).to_be_enabled(timeout=CHANGE)

    form.select("ZeRO stage", "none")
    form.select("optimizer offload", "cpu")
    expect(form.magic).to_have_value("%nexa_train --offload cpu", timeout=CHANGE)
    expect(form.error).to_have_count(1, timeout=CHANGE)
    expect(form.error).to_contain_text("optimizer offload", timeout=CHANGE)
    expect(form.error).to_contain_text("--zero 2", timeout=CHANGE)
    expect(form.train).to_be_disabled(timeout=CHANGE)
    form.select("optimizer offload", "none")
    expect(form.error).to_have_count(0, timeout=CHANGE)
    expect(form.train).to_be_enabled(timeout=CHANGE)

    # 4. A valid setting: two processes, a step limit.
    form.type("processes", "2")
    form.type("max steps", str(STEPS))
    expect(form.magic).to_have_value(f"%nexa_train --procs 2 --max-steps {STEPS}", timeout=CHANGE)
    expect(form.plan).to_contain_text("2 procs", timeout=CHANGE)
    expect(form.plan).not_to_contain_text("ZeRO", timeout=CHANGE)
    expect(form.train).to_be_enabled(timeout=CHANGE)


def train(form: Form) -> tuple[dict, dict]:
    """Click Train; return the first live frame that shows both ranks, and the end of the run."""
    form.train.click()
    expect(form.train).to_be_disabled(timeout=CHANGE)  # the kernel is training
    live, snap = None, None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        snap = form.page.evaluate(RUN_JS, FORM_CELL)
        frame = snap and snap["live"]
        if frame and not live and {"0", "1"} <= {rank for rank, n in frame["points"].items() if n > 1}:
            form.cell.locator(".widget-output").scroll_into_view_if_needed()
            button, progress = form.train.bounding_box(), form.cell.locator(".nexa-progress").bounding_box()
            if progress is not None:  # None when the live view was replaced by the final picture meanwhile
                live = frame
                form.page.screenshot(path=ARTIFACTS / "form-training.png")
                assert progress["y"] > button["y"] + button["height"], (
                    f"the dashboard is not under the form: {progress}"
                )
        if snap and snap["final"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the run started by Train did not finish; under the form: {snap}")
    return live, snap


def test_config_form_in_jupyterlab(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    lab = JupyterLab(tmp_path)
    left = []
    try:
        lab.start()
        nb = notebook(
            "%load_ext nexa_nb",
            "%config NexaMagics.refresh_interval = 0.2",
            TASK_CELL.replace("SLEEP", "0.15"),
            "%nexa_config --widget",
        )
        nbformat.write(nb, lab.root / "form.ipynb")

        with sync_playwright() as playwright, chromium(playwright) as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{lab.url}/lab/tree/form.ipynb?token={lab.token}", timeout=120_000)
            form = Form(page.locator(".jp-Notebook .jp-Cell").nth(FORM_CELL))
            try:
                run_all_cells(page)
                check_form(form)
                live, snap = train(form)
                output = form.cell.locator(".widget-output")
                expect(output).to_contain_text(f"Trained {STEPS} steps", timeout=CHANGE)  # the run's summary
                expect(form.train).to_be_enabled(timeout=60_000)  # the form is ready for the next run
                output.locator(".jp-OutputArea-output").last.scroll_into_view_if_needed()
                page.screenshot(path=ARTIFACTS / "form-trained.png")
            except (AssertionError, PlaywrightError) as exc:  # PlaywrightError: a control not found
                page.screenshot(path=ARTIFACTS / "form-failure.png")
                raise AssertionError(f"{exc}\n--- JupyterLab's log ---\n{lab.log_tail()}") from None

        assert live, f"the live dashboard never showed both ranks with more than one loss point: {snap}"
        assert live["progress"][1] == STEPS, live
        final = snap["final"]
        assert final["status"] == ["completed", f"completed {STEPS} steps"], snap
        assert final["points"]["0"] == STEPS and 1 < final["points"]["1"] <= STEPS, final
        assert snap["live"] is None, "the live dashboard is still under the form after the run"
        assert not errors, errors
    finally:
        left = lab.stop()
    assert not left, f"processes left after JupyterLab shut down: {left}"
