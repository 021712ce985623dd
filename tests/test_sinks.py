"""Sinks replayed from a recorded event stream: no training, no kernel, real widgets."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import pytest

from nexa_nb.events import (
    CheckpointSaved,
    EvalEnd,
    MemorySample,
    MicroStep,
    Note,
    RunEnded,
    RunStarted,
    StepEnd,
)
from nexa_nb.sinks import ConsoleSink, Dashboard, RunRecord, run_svg, status_text, summary_text
from nexa_nb.sinks.render import Series, memory_chart

GiB = 2**30
TOTAL = 20
PLAN = {
    "zero": 3,
    "offload_optimizer": "cpu",
    "offload_param": "none",
    "precision": "bf16",
    "procs": 2,
    "micro_batch": 2,
    "grad_accum": 4,
    "effective_batch": 16,
    "distributed_type": "DEEPSPEED",
    "device": "cuda",
}
COMPLETED = RunEnded("completed", TOTAL, final_loss=0.5)


def memory(rank: int) -> MemorySample:
    return MemorySample(
        allocated=2 * GiB, reserved=GiB * 5 // 2, peak=3 * GiB + rank * GiB // 2, capacity=80 * GiB, host_rss=5 * GiB
    )


def run_events(steps: int = TOTAL, end: RunEnded | None = COMPLETED, total: int = TOTAL) -> list:
    """2 ranks, accumulation 4, an eval, a checkpoint and a note at step 10, then `end`."""
    events = [RunStarted(PLAN, total, 2, "DEEPSPEED", notes=("optimizer offloaded to cpu",))]
    for step in range(1, steps + 1):
        for rank in (0, 1):
            events += [MicroStep(rank, step, micro, 4) for micro in range(1, 5)]
        for rank in (0, 1):
            events.append(
                StepEnd(
                    rank=rank,
                    step=step,
                    total_steps=total,
                    loss=2.5 - 0.1 * step + 0.01 * rank,
                    lr=1e-4,
                    grad_norm=1.0 / step,
                    samples_per_s=128.0,
                    tokens_per_s=65536.0,
                    memory=memory(rank),
                    grad_accum=4,
                    micro_batch=2,
                    accum_time_s=0.5,
                )
            )
        if step == 10:
            events += [
                EvalEnd(10, {"eval_loss": 1.6, "accuracy": 0.75}),
                CheckpointSaved(10, "ckpt/step-10"),
                Note("loss scale lowered to 1024", rank=1),
            ]
    if end is not None:
        events.append(end)
    return events


def feed(sink, events) -> None:
    for event in events:
        sink.handle(event)


# --- console -------------------------------------------------------------------------

MEM = "mem r0 3.00/80.00 GiB r1 3.50/80.00 GiB"
CONSOLE = f"""\
nexa: ZeRO-3 | offload optimizer=cpu | bf16 | 2 processes | effective batch 16 (micro-batch 2, accum 4) | cuda | 20 steps
note: optimizer offloaded to cpu
step 1/20 | loss 2.4000 | lr 1.00e-04 | grad 1.000 | 256.0 samples/s | 131072 tokens/s | mem r0 3.00/80.00 GiB
step 5/20 | loss 2.0000 | lr 1.00e-04 | grad 0.200 | 256.0 samples/s | 131072 tokens/s | {MEM}
step 10/20 | loss 1.5000 | lr 1.00e-04 | grad 0.100 | 256.0 samples/s | 131072 tokens/s | {MEM}
eval step 10 | eval_loss 1.6000 | accuracy 0.7500
checkpoint step 10 -> ckpt/step-10
note (rank 1): loss scale lowered to 1024
step 15/20 | loss 1.0000 | lr 1.00e-04 | grad 0.067 | 256.0 samples/s | 131072 tokens/s | {MEM}
step 20/20 | loss 0.5000 | lr 1.00e-04 | grad 0.050 | 256.0 samples/s | 131072 tokens/s | {MEM}
completed at step 20, final loss 0.5000
"""


def test_console_prints_expected_lines():
    out = io.StringIO()
    sink = ConsoleSink(out, every=5)
    feed(sink, run_events())
    sink.close()
    assert out.getvalue() == CONSOLE


def test_console_without_speed_and_memory_is_stable_text():
    out = io.StringIO()
    feed(ConsoleSink(out, every=10, show_speed=False, show_memory=False), run_events())
    lines = out.getvalue().splitlines()
    assert [line for line in lines if line.startswith("step")] == [
        "step 1/20 | loss 2.4000 | lr 1.00e-04 | grad 1.000",
        "step 10/20 | loss 1.5000 | lr 1.00e-04 | grad 0.100",
        "step 20/20 | loss 0.5000 | lr 1.00e-04 | grad 0.050",
    ]


def test_console_default_every_gives_about_ten_step_lines():
    out = io.StringIO()
    feed(ConsoleSink(out), run_events())
    assert sum(line.startswith("step") for line in out.getvalue().splitlines()) == 11  # step 1, then every 2nd


@pytest.mark.parametrize(
    "end, last_line",
    [
        (
            RunEnded("interrupted", 7, final_loss=1.8, message="interrupted at step 7", checkpoint_dir="ckpt/step-7"),
            "interrupted at step 7, final loss 1.8000 (checkpoint: ckpt/step-7)",
        ),
        (RunEnded("failed", 7, message="CUDA out of memory"), "failed at step 7, final loss n/a: CUDA out of memory"),
    ],
)
def test_console_end_states(end, last_line):
    out = io.StringIO()
    feed(ConsoleSink(out), run_events(steps=7, end=end))
    assert out.getvalue().splitlines()[-1] == last_line


# --- dashboard state -----------------------------------------------------------------


def fake_clock(step_s: float = 1.0):
    """A clock that advances `step_s` per reading; rank 0 reads it once per step."""
    ticks = iter(range(10**6))
    return lambda: next(ticks) * step_s


def test_dashboard_follows_a_complete_run():
    dashboard = Dashboard(refresh_interval=60)  # only the final redraw on RunEnded
    feed(dashboard, run_events())

    assert dashboard.step == dashboard.total == TOTAL
    assert dashboard.progress.value == dashboard.progress.max == TOTAL
    assert dashboard.progress.bar_style == "success"
    assert dashboard.points_per_rank == {0: TOTAL, 1: TOTAL}
    assert dashboard.memory_ranks == [0, 1]
    assert dashboard.status == "completed 20 steps"

    loss_html = dashboard.loss_view.value
    assert re.findall(r'class="nexa-loss" data-rank="(\d)" data-points="(\d+)"', loss_html) == [
        ("0", "20"),
        ("1", "20"),
    ]
    assert 'class="nexa-eval-loss" data-points="1"' in loss_html
    assert "eval at step 10: eval_loss 1.6000, accuracy 0.7500" in loss_html
    assert re.findall(r'class="nexa-memory-row" data-rank="(\d)"', dashboard.memory_view.value) == ["0", "1"]
    assert 'data-step="20" data-total="20"' in dashboard.progress_view.value
    assert 'data-zero="3"' in dashboard.header_view.value and "effective batch 16" in dashboard.header_view.value
    assert 'data-status="completed"' in dashboard.status_view.value
    assert "ckpt/step-10" in dashboard.status_view.value
    assert "rank 1: loss scale lowered to 1024" in dashboard.status_view.value


def test_dashboard_mid_run_shows_progress_accumulation_and_eta():
    dashboard = Dashboard(refresh_interval=60, clock=fake_clock())
    feed(dashboard, run_events(steps=7, end=None) + [MicroStep(0, 8, 3, 4)])
    dashboard.flush()

    assert (dashboard.step, dashboard.total) == (7, TOTAL)
    assert dashboard.status == "running: step 7/20"
    assert dashboard.points_per_rank == {0: 7, 1: 7}
    assert (dashboard.accumulation.value, dashboard.accumulation.max) == (3, 4)
    assert "micro-step 3/4 towards step 8" in dashboard.accumulation_view.value
    # one second per step for 13 remaining steps; rank 0's rates times 2 processes
    assert "step 7/20 · ETA 0:00:13 · 256.0 samples/s · 131,072 tokens/s" in dashboard.progress_view.value
    assert "lr 1.00e-04 · grad norm 0.143" in dashboard.scalars_view.value
    dashboard.close()


def test_dashboard_throttles_redraws():
    dashboard = Dashboard(refresh_interval=0.25)
    events = run_events(steps=1000, total=1000, end=None)  # 10 events per step
    assert len(events) > 10_000
    start = time.monotonic()
    feed(dashboard, events)
    elapsed = time.monotonic() - start
    # one at construction, then at most one per interval (the first without waiting)
    assert dashboard.render_count <= 2 + int(elapsed / 0.25)

    deadline = time.monotonic() + 5
    while dashboard.step < 1000 and time.monotonic() < deadline:  # no more events arrive...
        time.sleep(0.05)
    assert dashboard.points_per_rank == {0: 1000, 1: 1000}  # ...yet the last ones are drawn
    before = dashboard.render_count
    dashboard.handle(RunEnded("completed", 1000))
    assert dashboard.render_count == before + 1
    assert dashboard.render_count <= 3 + int((time.monotonic() - start) / 0.25)


@pytest.mark.parametrize(
    "end, status, data_status, summary_end",
    [
        (
            RunEnded("interrupted", 7, final_loss=1.8, message="interrupted at step 7"),
            "interrupted at step 7",
            "interrupted",
            "loss 2.4 -> 1.8; interrupted at step 7 of 20.",
        ),
        (
            RunEnded("failed", 7, message="CUDA out of memory"),
            "failed at step 7: CUDA out of memory",
            "failed",
            "loss 2.4 -> 1.8; failed at step 7 of 20: CUDA out of memory.",
        ),
    ],
)
def test_dashboard_end_states(end, status, data_status, summary_end):
    dashboard = Dashboard(refresh_interval=60)
    feed(dashboard, run_events(steps=7, end=end))
    assert dashboard.status == status
    assert f'data-status="{data_status}"' in dashboard.status_view.value
    assert dashboard.progress.bar_style == {"interrupted": "warning", "failed": "danger"}[data_status]
    picture, summary = dashboard.static_outputs()
    assert f'data-status="{data_status}"' in picture["image/svg+xml"]
    assert summary_end + " Accumulation: 7 steps of 4 micro-steps" in summary["text/plain"]


# --- the picture that stays ----------------------------------------------------------


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A real IPython shell (history in memory) so `display` publishes MIME bundles."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    yield InteractiveShell.instance(config=config)
    InteractiveShell.clear_instance()


SUMMARY = (
    "Trained 20 steps with ZeRO-3 (bf16, 2 processes, effective batch 16): loss 2.4 -> 0.5; completed. "
    "Last eval (step 10): eval_loss 1.6000, accuracy 0.7500. Checkpoint: ckpt/step-10. "
    "Accumulation: 20 steps of 4 micro-steps, 0.5 s a cycle, mean gradient norm 0.18, "
    "memory 3.00 GiB on average (peak 3.00 GiB)."
)


def test_finalize_replaces_the_widget_with_svg_and_summary(shell):
    from IPython.utils.capture import capture_output

    dashboard = Dashboard(refresh_interval=60)
    with capture_output() as captured:
        dashboard.show()
        feed(dashboard, run_events())
        dashboard.close()  # the drain thread's last call
        dashboard.finalize()
        dashboard.finalize()  # a second call changes nothing

    live, picture, summary = captured.outputs
    assert "application/vnd.jupyter.widget-view+json" in live.data
    assert picture.transient["display_id"] == live.transient["display_id"]  # shown in the widget's place
    svg = picture.data["image/svg+xml"]
    assert svg.startswith("<svg") and svg.count('class="nexa-loss"') == 2
    assert re.findall(r'class="nexa-loss" data-rank="(\d)"', svg) == ["0", "1"]
    assert re.findall(r'class="nexa-memory-row" data-rank="(\d)"', svg) == ["0", "1"]
    assert "completed 20 steps" in svg
    assert summary.data == {"text/markdown": SUMMARY, "text/plain": SUMMARY}
    assert dashboard.widget.comm is None and dashboard.progress.comm is None  # no widget left behind


def test_finalize_without_show_displays_both_outputs(shell):
    from IPython.utils.capture import capture_output

    dashboard = Dashboard(refresh_interval=60)
    feed(dashboard, run_events(steps=3, end=RunEnded("interrupted", 3, final_loss=2.2)))
    with capture_output() as captured:
        dashboard.finalize()
    picture, summary = captured.outputs
    assert picture.data["text/plain"] == "interrupted at step 3"
    assert "interrupted at step 3 of 20" in summary.data["text/markdown"]


# --- render --------------------------------------------------------------------------


def test_record_and_summary_without_a_dashboard():
    record = RunRecord()
    for event in run_events():
        record.handle(event)
    assert status_text(record) == "completed 20 steps"
    assert summary_text(record) == SUMMARY
    assert run_svg(record).count("<polyline") == 2 + 1 + 2  # loss per rank, eval, lr and grad norm


def test_long_series_are_sampled_and_nan_skipped():
    series = Series()
    for step in range(10_000):
        series.append(step, float("nan") if step == 5000 else 1.0)
    points = series.sample(600)
    assert len(points) <= 601 and points[-1] == (9999, 1.0)
    assert all(y == 1.0 for _, y in points)


def test_cpu_memory_rows_show_host_rss():
    svg = memory_chart({0: MemorySample(host_rss=GiB), 1: MemorySample(host_rss=2 * GiB)})
    assert re.findall(r'data-rank="(\d)"', svg) == ["0", "1"]
    assert "host RSS 2.00 GiB" in svg and ">alloc" not in svg


def test_sinks_do_not_import_torch():
    code = "import nexa_nb.sinks.dashboard, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_lets_one_call_through_per_interval(monkeypatch):
    from nexa_nb.engine import reporter

    now = [100.0]
    monkeypatch.setattr(reporter.time, "monotonic", lambda: now[0])
    due = reporter.Every(0.5)
    seen = []
    for _ in range(10):
        seen.append(due())
        now[0] += 0.25
    assert seen == [True, False] * 5


def test_worker_events_go_in_batches_while_steps_are_fast_and_at_once_when_slow(monkeypatch):
    from nexa_nb import launch

    now = [0.0]
    monkeypatch.setattr(launch.time, "monotonic", lambda: now[0])
    sent = []
    emit = launch.EventBatcher(sent.append, interval=0.1)
    step_end = {e.step: e for e in run_events() if isinstance(e, StepEnd) and e.rank == 0}.__getitem__
    emit(RunStarted(PLAN, 9, 1, "NO"))
    for step in range(1, 5):  # 40 ms a step: a batch every 100 ms
        now[0] += 0.04
        emit(step_end(step))
    now[0] += 1.0  # a slow step goes at once
    emit(step_end(5))
    now[0] += 0.01
    emit(step_end(6))
    now[0] += 0.01
    emit(step_end(TOTAL))  # the last step goes at once
    emit(COMPLETED)

    assert [[type(e).__name__ + (str(e.step) if isinstance(e, StepEnd) else "") for e in batch] for batch in sent] == [
        ["RunStarted"],
        ["StepEnd1", "StepEnd2", "StepEnd3"],
        ["StepEnd4", "StepEnd5"],
        ["StepEnd6", f"StepEnd{TOTAL}"],
        ["RunEnded"],
    ]
