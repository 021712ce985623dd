"""The live dashboard in a real browser: JupyterLab in headless Chromium runs a notebook
that trains in two CPU processes; the page shows both ranks' loss curves and memory while
the run goes on, and the static picture once it ends.

Screenshots go to tests/artifacts/ (browser-mid-run.png, browser-end.png).
"""

from __future__ import annotations

import time

import nbformat
import pytest
from browser.lab import ARTIFACTS, CHROMIUM, PROMPTS_JS, JupyterLab, chromium, run_all_cells, training_notebook
from playwright.sync_api import sync_playwright

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} (make browser-deps)"),
]

STEPS = 40
TRAIN_CELL = 3  # index of the `%nexa_train` cell

# What the training cell shows: the live widget (its SVG is in the DOM) and the static
# picture (an <img> holding the SVG as a data: URL, parsed here the same way).
SNAPSHOT_JS = """
(index) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  if (!cell) return null;
  const read = (root) => {
    const progress = root.querySelector('.nexa-progress');
    const status = root.querySelector('.nexa-status');
    return {
      points: Object.fromEntries([...root.querySelectorAll('polyline.nexa-loss')]
        .map((p) => [p.getAttribute('data-rank'), Number(p.getAttribute('data-points'))])),
      memory: [...root.querySelectorAll('g.nexa-memory-row')].map((g) => g.getAttribute('data-rank')),
      progress: progress && [Number(progress.dataset.step), Number(progress.dataset.total)],
      status: status && [status.getAttribute('data-status'), status.textContent],
    };
  };
  const live = cell.querySelector('.jp-OutputArea .widget-vbox');
  const img = cell.querySelector('.jp-OutputArea img[src^="data:image/svg+xml"]');
  const svg = img && decodeURIComponent(img.src.slice(img.src.indexOf(',') + 1));
  const output = cell.querySelector('.jp-OutputArea');
  return {
    prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
    live: live && read(live),
    final: svg && read(new DOMParser().parseFromString(svg, 'image/svg+xml')),
    text: output ? output.innerText.slice(-3000) : '',
  };
}
"""


def both_ranks(view) -> bool:
    """Rank 0 and 1 each have more than one loss point, and a memory row."""
    points = view["points"]
    return points.get("0", 0) > 1 and points.get("1", 0) > 1 and {"0", "1"} <= set(view["memory"])


def screenshot(page, name: str) -> None:
    page.locator(".jp-Cell").nth(TRAIN_CELL).scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / name)


def test_live_dashboard_in_jupyterlab(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    lab = JupyterLab(tmp_path)
    left = []
    try:
        lab.start()
        nb = training_notebook(
            f"res = %nexa_train --procs 2 --max-steps {STEPS}",
            sleep=0.15,
            more=("print('result:', res.status, len(res.history))",),
        )
        nbformat.write(nb, lab.root / "test.ipynb")

        with sync_playwright() as playwright, chromium(playwright) as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{lab.url}/lab/tree/test.ipynb?token={lab.token}", timeout=120_000)
            try:
                run_all_cells(page)
            except AssertionError:
                screenshot(page, "browser-failure.png")
                raise

            live_ok, last_live, shot_at = None, None, 0
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                snap = page.evaluate(SNAPSHOT_JS, TRAIN_CELL)
                live = snap and snap["live"]
                if live and live["progress"]:
                    last_live = live
                    step = live["progress"][0]
                    if both_ranks(live) and step < STEPS:
                        live_ok = live_ok or live
                        if not shot_at or shot_at < STEPS // 2 <= step:  # an early frame, then a later one
                            screenshot(page, "browser-mid-run.png")
                            shot_at = step
                if snap and snap["final"] and "*" not in snap["prompt"]:
                    break
                time.sleep(0.1)
            else:
                screenshot(page, "browser-failure.png")
                pytest.fail(
                    f"the training cell did not finish; prompts {page.evaluate(PROMPTS_JS)}, "
                    f"training cell {snap}\n{lab.log_tail()}"
                )

            result = page.locator(".jp-Cell").nth(TRAIN_CELL + 1).locator(".jp-OutputArea-output")
            result.wait_for(timeout=30_000)
            result = result.inner_text()
            snap = page.evaluate(SNAPSHOT_JS, TRAIN_CELL)
            screenshot(page, "browser-end.png")

        assert live_ok, f"the live widget never showed both ranks with more than one point before the end: {snap}"
        assert live_ok["progress"][1] == STEPS, live_ok
        assert f"completed {STEPS}" in result, result
        final = snap["final"]
        # The end: the progress reached its total. The live widget's last frame (40/40) may be
        # replaced by the picture between two polls; the picture says it in its status line.
        assert final["status"] == ["completed", f"completed {STEPS} steps"], (final, last_live)
        # rank 0 reports every step; the others a few times a second, and their last step
        assert final["points"]["0"] == STEPS and 1 < final["points"]["1"] <= STEPS, final
        assert final["memory"] == ["0", "1"], final
        assert f"Trained {STEPS} steps" in snap["text"], snap["text"]
        assert snap["live"] is None, "the live widget is still on the page after finalize"
        assert not errors, errors
    finally:
        left = lab.stop()
    assert not left, f"processes left after JupyterLab shut down: {left}"
