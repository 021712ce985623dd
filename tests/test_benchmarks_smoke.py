"""The CPU benchmark harness in its tiny mode (``--quick``): it runs figures 1-5 end to end and
writes a complete results file. It checks the harness, never a speed: the machine running the
tests may be busy, and the quick settings measure nothing meaningful."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIGURES = [
    "1_loop_parity_1proc",
    "1_loop_parity_2proc",
    "2_dashboard_cost",
    "3_accumulation",
    "4_memory_plan_min",
    "4_memory_plan_max",
    "5a_load_ext_seconds",
    "5b_startup",
]


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_run_writes_every_figure(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.iterdir()) if results.is_dir() else []
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (sorted(results.iterdir()) if results.is_dir() else []) == before  # --out was honoured

    [path] = tmp_path.glob("*-cpu-quick.json")
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["settings"]["quick"] is True
    assert {"torch", "accelerate", "deepspeed", "transformers", "nexa-nb"} <= set(data["versions"])
    machine = data["machine"]
    assert number(machine["logical_cores"]) and number(machine["memory_gib"]) and machine["cpu_model"]
    assert all(number(x) for x in machine["load_average_before"] + machine["load_average_after"])

    assert sorted(data["figures"]) == sorted(FIGURES)
    for key in FIGURES:
        figure = data["figures"][key]
        assert number(figure["ratio"]) and figure["ratio"] > 0, (key, figure)
        assert figure["n"] >= 1 and figure["goal"] and figure["met_goal"] in (True, False)
        assert figure["sides"], key
        for side in figure["sides"].values():
            assert side["values"] and all(number(v) for v in side["values"]), (key, side)
            assert number(side["median"])
        # Same weights, nothing heavy imported...; whether the machine was quiet is recorded, not asserted.
        assert all(ok for name, ok in figure["checks"].items() if name != "quiet_machine"), (key, figure["checks"])
        assert number(figure["details"]["others_busy_cores"])
        if key not in ("4_memory_plan_min", "4_memory_plan_max"):
            assert "quiet_machine" in figure["checks"], key
        if "pair_ratios" in figure["details"]:  # an A/B figure: the median of the pair ratios, and their spread
            low, high = figure["spread_iqr"]
            assert (
                figure["ratio"] == statistics.median(figure["details"]["pair_ratios"])
                and low <= figure["ratio"] <= high
            )
        assert len(figure["load_average"]["before"]) == 3

    table = proc.stdout[proc.stdout.index("figure ") :]
    for key in FIGURES:
        assert data["figures"][key]["title"] in table


def test_a_busy_machine_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "1", "--max-load", "-1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "load average" in line and "--noisy" in line
    assert not list(tmp_path.iterdir())
