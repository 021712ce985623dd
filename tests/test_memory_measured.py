"""Every run's memory, measured against the plan: `TrainResult.memory` and the summary's line."""

from __future__ import annotations

import io

import pytest

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.memory import measured_memory
from nexa_nb.sinks import ConsoleSink, RunRecord, summary_text
from nexa_nb.text import format_bytes
from tests.conftest import regression_task


def test_a_two_process_run_has_planned_and_measured_memory_for_each_rank(quiet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, batch_size=4, max_steps=4)

    memory = result.memory
    assert [m.rank for m in memory] == [0, 1]
    planned = result.plan.planned_device_bytes
    assert planned > 0
    for m in memory:
        assert m.planned_bytes == planned and m.measured_bytes > 0
        assert m.ratio == pytest.approx(m.measured_bytes / planned)
    steps = [e for e in quiet.events if isinstance(e, ev.StepEnd)]
    assert {m.rank: m.measured_bytes for m in memory} == {
        rank: max(e.memory.host_rss for e in steps if e.rank == rank) for rank in (0, 1)
    }

    record = RunRecord()
    for event in quiet.events:
        record.handle(event)
    top = max(memory, key=lambda m: m.measured_bytes)
    line = (
        f"memory: planned {format_bytes(planned)}, measured {format_bytes(top.measured_bytes)} per process "
        f"(ratio {top.ratio:.2f})"
    )
    assert line in summary_text(record)


def started(planned: int | None) -> ev.RunStarted:
    return ev.RunStarted(plan_summary={"planned_memory": planned}, total_steps=2, num_processes=2, distributed_type="X")


def step(rank: int, memory: ev.MemorySample) -> ev.StepEnd:
    return ev.StepEnd(rank, 1, 2, 1.0, 1e-3, None, 1.0, None, memory)


def test_a_gpu_counts_the_allocator_peak_and_a_retry_starts_again():
    gib = 2**30
    events = [
        started(8 * gib),
        step(0, ev.MemorySample(peak=12 * gib, capacity=80 * gib, host_rss=gib)),  # then out of memory
        started(4 * gib),  # the retry, at a smaller micro-batch
        step(0, ev.MemorySample(peak=3 * gib, capacity=80 * gib, host_rss=gib)),
        step(1, ev.MemorySample(peak=5 * gib, capacity=80 * gib, host_rss=gib)),
        step(0, ev.MemorySample(peak=2 * gib, capacity=80 * gib, host_rss=gib)),
    ]
    memory = measured_memory(events)
    assert [(m.rank, m.planned_bytes, m.measured_bytes, m.ratio) for m in memory] == [
        (0, 4 * gib, 3 * gib, 0.75),
        (1, 4 * gib, 5 * gib, 1.25),
    ]

    console = ConsoleSink(stream=io.StringIO())
    for event in [*events, ev.RunEnded("completed", 2)]:
        console.handle(event)
    assert console.stream.getvalue().splitlines()[-1] == (
        "memory: planned 4.00 GiB, measured 5.00 GiB per process (ratio 1.25)"
    )


def test_without_a_planned_figure_there_is_no_ratio_and_no_line():
    events = [started(None), step(0, ev.MemorySample(host_rss=2**30))]
    assert [(m.measured_bytes, m.ratio) for m in measured_memory(events)] == [(2**30, None)]
    record = RunRecord()
    for event in events:
        record.handle(event)
    assert "memory:" not in summary_text(record)
