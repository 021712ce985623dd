"""Streamed train data (torch and datasets IterableDatasets), through the real launcher.

Reads are counted by the datasets themselves: each process appends what it reads to a file
named after its process id, so the kernel's reads (the preflight's one batch) and the
workers' are told apart.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

import nexa_nb
from tests.conftest import regression_task
from tests.test_bad_inputs import _one_clear_line
from tests.test_magics import nexa  # noqa: F401  (fixtures)


def _log(folder: str, kind: str, ids) -> None:
    with open(Path(folder) / f"{kind}-{os.getpid()}.txt", "a") as f:
        f.write("".join(f"{int(i)}\n" for i in ids))


def _logged(folder: Path, kind: str) -> dict[int, list[int]]:
    """{process id: the ids it logged, in order}."""
    return {int(p.stem.split("-")[1]): [int(x) for x in p.read_text().split()] for p in folder.glob(f"{kind}-*.txt")}


class Stream(IterableDataset):
    """(x, y, id) samples of the regression task, in order; a generator, restarted at each __iter__."""

    def __init__(self, pairs, folder: str):
        self.pairs, self.folder = pairs, folder

    def __iter__(self):
        for i, (x, y) in enumerate(self.pairs):
            _log(self.folder, "read", [i])
            yield x, y, i


class Recorded(Dataset):
    """A map-style dataset that logs which index is read: the order a map-style run trains in."""

    def __init__(self, data, folder: str):
        self.data, self.folder = data, folder

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        _log(self.folder, "map", [i])
        return self.data[i]


def _dict_task(data):
    base = regression_task()

    def loss_fn(out, batch):
        return torch.nn.functional.mse_loss(out, batch["y"])

    return nexa_nb.Task(base.model, data, loss_fn=loss_fn, forward=lambda m, b: m(b["x"]), name="stream")


def _stream_task(n: int, folder: str, collate_fn=None):
    """The regression task over a `Stream`; the forward logs the ids each rank trains on."""
    base = regression_task(n=n)

    def forward(model, batch):
        _log(folder, "trained", batch[2].tolist())
        return model(batch[0])

    def loss_fn(out, batch):
        return torch.nn.functional.mse_loss(out, batch[1])

    stream = Stream(base.train_data, folder)
    return nexa_nb.Task(base.model, stream, collate_fn=collate_fn, loss_fn=loss_fn, forward=forward, name="stream")


def test_a_datasets_stream_reaches_the_weights_of_the_same_samples_given_map_style(tmp_path, quiet):
    """The map-style run shuffles; its order is logged and the stream yields the samples in that order.

    One pass (4 steps x 16 samples of 64), 1 process; the comparison is exact.
    """
    datasets = pytest.importorskip("datasets")
    pairs = regression_task(n=64).train_data
    table = datasets.Dataset.from_dict(
        {"x": [p[0].tolist() for p in pairs], "y": [p[1].tolist() for p in pairs]}
    ).with_format("torch")
    options = dict(sinks=[quiet], batch_size=8, grad_accum=2, max_steps=4, lr=0.05)
    mapped = nexa_nb.train(_dict_task(Recorded(table, str(tmp_path))), **options)
    (order,) = [ids for pid, ids in _logged(tmp_path, "map").items() if pid != os.getpid()]
    assert sorted(order) == list(range(64))

    streamed = nexa_nb.train(_dict_task(table.select(order).to_iterable_dataset()), **options)

    assert [h["epoch"] for h in streamed.history] == [0, 0, 0, 0]
    assert streamed.losses == mapped.losses
    a, b = mapped.trained_model().state_dict(), streamed.trained_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_read_and_train_every_sample_once_per_pass(tmp_path, quiet):
    """40 samples, 8 a step (2 processes x 4): 12 steps are 2 passes and 16 samples of a third.

    The collate adds a tensor whose width changes from batch to batch (as padding to the longest
    does): each rank collates its own micro-batch, so the ranks' batches need not match."""

    def collate(samples):
        return (*default_collate(samples), torch.zeros(len(samples), int(samples[0][2]) % 3 + 1))

    task = _stream_task(40, str(tmp_path), collate_fn=collate)
    result = nexa_nb.train(task, sinks=[quiet], procs=2, batch_size=4, max_steps=12)

    reads = _logged(tmp_path, "read")
    assert reads.pop(os.getpid()) == [0, 1, 2, 3]  # the preflight: one micro-batch, no more
    (worker_reads,) = reads.values()  # one worker (rank 0) reads the stream, each sample once a pass
    assert worker_reads == list(range(40)) * 2 + list(range(16))
    trained = _logged(tmp_path, "trained")
    # The forward reads tensor values in Python (it logs ids), so fake tensors cannot trace it: the
    # preflight measures the first step on real tensors in a process of its own, on the first
    # micro-batch and then on it twice over. The workers train what they read.
    (measured,) = [pid for pid, ids in trained.items() if ids == [0, 1, 2, 3] * 3]
    del trained[measured]
    assert len(trained) == 2 and all(len(ids) == 48 for ids in trained.values())
    assert Counter(sum(trained.values(), [])) == Counter(worker_reads)  # each sample read is trained once
    assert [h["epoch"] for h in result.history] == [0] * 5 + [1] * 5 + [2] * 2


@pytest.mark.parametrize(
    "options, tolerance",
    [
        pytest.param({}, 0.0, id="plain"),
        pytest.param(dict(zero=2, procs=2), 1e-6, id="zero2-2procs", marks=pytest.mark.slow),
    ],
)
def test_a_resume_mid_stream_continues_the_same_loss_curve(options, tolerance, tmp_path, quiet):
    """Checkpoint at step 7 (sample 56 of a 40-sample stream: 16 into the second pass), resume to 12."""
    task = _stream_task(40, str(tmp_path))
    common = dict(sinks=[quiet], batch_size=8 // options.get("procs", 1), max_steps=12, lr=0.05, **options)
    full = nexa_nb.train(task, ckpt_dir=str(tmp_path / "full"), ckpt_every=7, **common)
    step7 = tmp_path / "full" / "step-0000007"
    assert nexa_nb.engine.read_checkpoint_state(step7).stream_position == (1, 16)

    resumed = nexa_nb.train(task, ckpt_dir=str(tmp_path / "resumed"), resume=str(step7), **common)

    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert resumed.losses[7:] == pytest.approx(full.losses[7:], abs=tolerance, rel=0)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history]
    assert sum(full.losses[-3:]) < 0.5 * sum(full.losses[:3])  # it learns, ZeRO-2 in 2 processes too
    if options:
        assert full.distributed_type == "DEEPSPEED" and full.num_processes == 2


def _torch_stream(folder):
    return Stream(regression_task(n=16).train_data, str(folder))


def _datasets_stream(folder):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"x": [[1.0, 2.0]] * 16, "y": [[1.0]] * 16}).to_iterable_dataset()


@pytest.mark.parametrize("make", [_torch_stream, _datasets_stream], ids=["torch", "datasets"])
def test_a_stream_without_max_steps_gets_one_clear_line(make, shell, nexa, tmp_path, capsys):  # noqa: F811
    shell.user_ns["task"] = nexa_nb.Task(torch.nn.Linear(2, 1), make(tmp_path / "reads"))
    (tmp_path / "reads").mkdir()
    _one_clear_line(shell, capsys, tmp_path, "%nexa_train --ckpt-dir ckpt", "pass --max-steps N")
    assert not list((tmp_path / "reads").iterdir())  # refused before reading the stream


def test_a_stream_as_eval_data_or_an_empty_stream_gets_one_clear_line(shell, nexa, tmp_path, capsys):  # noqa: F811
    (tmp_path / "reads").mkdir()
    data = regression_task(n=16).train_data
    shell.user_ns["evals"] = nexa_nb.Task(torch.nn.Linear(8, 1), data, eval_data=_torch_stream(tmp_path / "reads"))
    shell.user_ns["empty"] = nexa_nb.Task(torch.nn.Linear(8, 1), Stream([], str(tmp_path / "reads")))
    _one_clear_line(shell, capsys, tmp_path, "%nexa_train evals --max-steps 2", "eval_data must be map-style")
    _one_clear_line(shell, capsys, tmp_path, "%nexa_train empty --max-steps 2", "a stream of 0 sample(s)")
