"""Evaluation counts every eval sample exactly once, in 1 and 2 processes and under ZeRO-3, for an
eval set whose size is not a multiple of the batch: Accelerate pads the last batches with repeats."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import nexa_nb
from nexa_nb.engine.evaluation import batch_size, take_first

EVAL_SIZE = 37  # with batch 4: not a multiple of 4, nor of 4 x 2 processes


def mse_task() -> nexa_nb.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 + EVAL_SIZE, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(len(x), 1, generator=g)
    data = list(zip(x, y))

    def score(outputs):
        errors = (outputs["prediction"] - outputs["target"]) ** 2
        return {"mse": errors.mean(), "n": len(errors), "ids": outputs["id"].sum()}

    eval_data = [(xi, yi, torch.tensor(i)) for i, (xi, yi) in enumerate(data[64:])]
    return nexa_nb.Task(
        lambda: torch.nn.Linear(3, 1),
        data[:64],
        eval_data=eval_data,
        forward=lambda model, batch: model(batch[0]),
        loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[1]),
        predict=lambda out, batch: {"prediction": out, "target": batch[1], "id": batch[2]},
        score=score,
    )


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"procs": 1}, {"procs": 2}, {"procs": 2, "zero": 3}], ids=["1", "2", "2-zero3"])
def test_every_eval_sample_counts_once(options):
    result = nexa_nb.train(mse_task(), batch_size=4, max_steps=4, lr=0.05, sinks=[], **options)
    metrics = result.eval_metrics
    assert metrics["n"] == EVAL_SIZE
    assert metrics["ids"] == sum(range(EVAL_SIZE))  # each sample once: no repeat, none missing
    # Two independent paths over the same samples: the sample-weighted loss and the gathered predictions.
    assert metrics["loss"] == pytest.approx(metrics["mse"], rel=1e-5)


def test_take_first_keeps_the_batch_type():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": torch.arange(6).view(3, 2), "b": Pair(torch.arange(3), [torch.ones(3)])}
    first = take_first(batch, 2)
    assert first["a"].tolist() == [[0, 1], [2, 3]] and isinstance(first["b"], Pair)
    assert first["b"].x.tolist() == [0, 1] and first["b"].y[0].tolist() == [1.0, 1.0]
    assert batch_size(batch) == 3 and batch_size((torch.zeros(5, 2), torch.zeros(5))) == 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"score": None}, "Task(predict=...) and Task(score=...) go together"),
        ({"eval_data": None}, "scores eval_data, and the task has none"),
        ({"predict": lambda out, batch: out}, "return a dict of per-sample tensors"),
        ({"predict": lambda out, batch: {"n": 3}}, "'n' is int, not a tensor with one row per sample"),
    ],
)
def test_bad_scoring_is_one_line_before_any_process(change, message):
    task = mse_task()
    task.model = torch.nn.Linear(3, 1)  # a module: its forward is tried in the kernel
    for name, value in change.items():
        setattr(task, name, value)
    with pytest.raises(nexa_nb.TrainingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nexa_nb.train(task, batch_size=4, max_steps=1, sinks=[])


def test_a_dataclass_batch_is_measured_and_cut():
    from dataclasses import dataclass

    @dataclass
    class Batch:
        input_ids: torch.Tensor
        labels: torch.Tensor

    batch = Batch(torch.zeros(5, 3), torch.arange(5))
    assert batch_size(batch) == 5
    first = take_first(batch, 2)
    assert isinstance(first, Batch) and first.labels.tolist() == [0, 1]
