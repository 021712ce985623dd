"""`TrainResult.accumulation_stats`: the accumulation guide's statistics, from what the run reported."""

from __future__ import annotations

import pytest

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.accumulation import memory_in_use
from nexa_nb.sinks import RunRecord, summary_text
from tests.conftest import regression_task


def test_accumulation_stats_are_the_history_and_the_events_of_a_two_process_run(quiet):
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, batch_size=4, grad_accum=4, max_steps=6)

    stats = result.accumulation_stats
    steps = [e for e in quiet.events if isinstance(e, ev.StepEnd) and e.rank == 0]
    assert stats.optimizer_steps == len(result.history) == len(steps) == 6
    assert stats.micro_steps == 6 * 4
    assert stats.mean_grad_norm == pytest.approx(sum(h["grad_norm"] for h in result.history) / 6)
    memory = [memory_in_use(e.memory) for e in steps]
    assert stats.mean_memory_bytes == round(sum(memory) / 6) and stats.peak_memory_bytes == max(memory) > 0
    assert stats.mean_cycle_s == pytest.approx(sum(e.accum_time_s for e in steps) / 6) and stats.mean_cycle_s > 0

    record = RunRecord()
    for event in quiet.events:
        record.handle(event)
    assert stats.line() in summary_text(record)
    assert stats.line().startswith("Accumulation: 6 steps of 4 micro-steps, ")
