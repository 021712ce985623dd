"""--batch-size auto: the largest micro-batch within the memory budget, tried in the run's own set-up
before training, keeping --target-batch, and leaving nothing of its trials in the run."""

from __future__ import annotations

import pytest
import torch

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.config import ConfigError, resolve_config
from nexa_nb.engine.auto_batch import candidate_sizes, search_sizes
from nexa_nb.sinks import RunRecord, summary_text
from nexa_nb.text import format_bytes

TARGET = 1024
BUDGET = 2**30  # about 0.3-0.65 GiB of a worker's set-up (ZeRO-3 the most) and 3 MiB a sample: 128 fits, not 512


def wide_task(n: int = TARGET, width: int = 1 << 18):
    """A regression through one wide hidden layer: activations of about 3 MiB a sample (hidden
    values, ReLU and their gradients in fp32), against 18 MiB of weights."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=g), torch.randn(n, 1, generator=g)

    def model():
        return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def loss_fn(out, batch):
        return torch.nn.functional.mse_loss(out, batch[-1])

    return nexa_nb.Task(model, list(zip(x, y)), loss_fn=loss_fn, name="wide")


def test_sizes_double_then_bisect_to_the_largest_that_fits():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 37

    assert search_sizes(range(1, 101), fits) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling until the first miss
    assert tried[7:] == [48, 40, 36, 38, 37]  # then bisection between 32 and 64
    assert search_sizes(range(1, 101), lambda size: True) == 100
    assert search_sizes(range(1, 101), lambda size: False) is None


def test_candidates_divide_each_process_share_of_the_target_batch():
    assert candidate_sizes(samples=1000, world=2, target_batch=24, grad_accum=1) == (1, 2, 3, 4, 6, 12)
    assert candidate_sizes(samples=100, world=2, target_batch=None, grad_accum=5) == tuple(range(1, 11))
    assert candidate_sizes(samples=None, world=1, target_batch=None, grad_accum=1)[-1] == 1024  # a stream


def auto_run(sinks, procs: int, zero: int | None) -> nexa_nb.TrainResult:
    """A run of two steps with --batch-size auto, checked: the budget limited the search, the sizes
    that fit stayed within it, and the effective batch is the target."""
    result = nexa_nb.train(
        wide_task(),
        sinks=sinks,
        procs=procs,
        zero=zero,
        batch_size="auto",
        target_batch=TARGET,
        memory_budget=BUDGET,
        max_steps=2,
    )
    search, plan = result.batch_search, result.plan
    assert result.status == "completed" and len(result.history) == 2
    assert plan.micro_batch == search["chosen"] and plan.effective_batch == TARGET
    assert plan.grad_accum == TARGET // (plan.micro_batch * procs)
    assert search["chosen"] < TARGET // procs  # the budget limited the search
    fits = [t for t in search["tried"] if t["fit"]]
    misses = [t for t in search["tried"] if not t["fit"]]
    assert max(t["size"] for t in fits) == search["chosen"] < min(t["size"] for t in misses)
    assert all(t["peak_bytes"] <= BUDGET for t in fits) and all(t["peak_bytes"] > BUDGET for t in misses)
    assert [t["size"] for t in search["tried"]][:3] == [1, 2, 4]
    assert search["line"].endswith(f"chose {search['chosen']}")
    return result


@pytest.mark.parametrize("procs", [1, 2], ids=["one process", "DDP, two processes"])
def test_auto_picks_a_micro_batch_within_the_budget_that_trains_to_the_end(quiet, tmp_path, monkeypatch, procs):
    monkeypatch.chdir(tmp_path)
    result = auto_run([quiet], procs, zero=None)

    record = RunRecord()
    for event in quiet.events:
        record.handle(event)
    assert result.batch_search["line"] in summary_text(record)
    # each size is said as soon as it is tried, before the run starts
    started = next(i for i, e in enumerate(quiet.events) if isinstance(e, ev.RunStarted))
    said = [e.message for e in quiet.events[:started] if isinstance(e, ev.Note)]
    tried = result.batch_search["tried"]
    assert said == [
        f"batch size auto: micro-batch {t['size']} {'fits' if t['fit'] else 'over'} "
        f"({format_bytes(t['peak_bytes'])} of {format_bytes(BUDGET)} per process)"
        for t in tried
    ]


def test_zero3_auto_leaves_no_trace_of_its_trials_in_the_run(quiet, tmp_path, monkeypatch):
    """ZeRO-3 in two processes: the weights after training equal those of a run given the chosen
    micro-batch, with the same seed."""
    monkeypatch.chdir(tmp_path)
    auto = auto_run([quiet], procs=2, zero=3)
    given = nexa_nb.train(
        wide_task(), sinks=[quiet], procs=2, zero=3, batch_size=auto.plan.micro_batch, target_batch=TARGET, max_steps=2
    )

    assert given.plan.grad_accum == auto.plan.grad_accum and given.batch_search is None
    assert auto.losses == given.losses
    trained, expected = auto.trained_model().state_dict(), given.trained_model().state_dict()
    assert all(torch.equal(trained[name], expected[name]) for name in expected)


def test_auto_refuses_an_accumulation_that_contradicts_the_target_batch():
    with pytest.raises(ConfigError, match="--grad-accum 2 contradicts --target-batch 64 with --batch-size auto"):
        resolve_config(arguments=dict(batch_size="auto", grad_accum=2, target_batch=64))
    with pytest.raises(ConfigError, match="64 cannot be shared by 3 processes"):
        resolve_config(arguments=dict(batch_size="auto", target_batch=64, procs=3))
    assert resolve_config(arguments=dict(batch_size="AUTO", memory_budget="1.5GiB")).memory_budget == 3 * 2**29
