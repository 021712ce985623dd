"""The CPU benchmark harness in its tiny mode (``--quick``): it runs figures 1-5, 11 and 12 end to
end and writes a complete results file, named by its figures, next to earlier ones. It checks
the harness, never a speed: the machine running the tests may be busy, and the quick settings
measure nothing meaningful."""

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
    "11_record_cost",
    "12_attach_lag_median",
    "12_attach_lag_p95",
    "13_against_a_plain_hand_loop_1proc",
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

    [path] = tmp_path.glob("*-cpu-fig1_2_3_4_5_11_12_13-quick.json")
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
        if not key.startswith(("4_", "12_")):  # not timed / detached (its own run is another process)
            assert "quiet_machine" in figure["checks"], key
        if "pair_ratios" in figure["details"]:  # an A/B figure: the median of the pair ratios, and their spread
            low, high = figure["spread_iqr"]
            assert (
                figure["ratio"] == statistics.median(figure["details"]["pair_ratios"])
                and low <= figure["ratio"] <= high
            )
        assert len(figure["load_average"]["before"]) == 3

    # Attach lag: one lag per step but the last (its end is the next step's start), in seconds.
    lag = data["figures"]["12_attach_lag_median"]
    assert lag["n"] == data["settings"]["attach_steps"] - 1 and lag["details"]["per_run"]
    assert all(abs(v) < 60 for v in lag["sides"]["lag_s"]["values"])
    assert data["figures"]["12_attach_lag_p95"]["ratio"] >= lag["ratio"]

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


def test_a_results_file_is_named_by_its_figures_and_never_overwritten(tmp_path):
    """Figure 4 (the memory plan against DeepSpeed's estimators: seconds, and untimed) run twice:
    the second run's file goes beside the first, which stays as it was."""
    command = [sys.executable, "-m", "benchmarks.run", "--only", "4", "--out", str(tmp_path)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    [path] = tmp_path.iterdir()
    assert path.name.endswith("-cpu-fig4.json") and path.name in first.stdout
    written = path.read_bytes()

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = path.with_name(path.stem + "-2.json")
    assert sorted(tmp_path.iterdir()) == sorted([path, again]) and again.name in second.stdout
    assert path.read_bytes() == written
    assert json.loads(again.read_text())["settings"]["figures_run"] == [4]


def test_an_unknown_figure_is_refused_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "1,7", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "--only 1,7" in line and "benchmarks.gpu" in line
    assert not list(tmp_path.iterdir())
