"""The step loop never makes the host wait for the device.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``)
waits until the device has run everything queued so far: for fast steps the device then idles
while the host prepares the next one. The engine reads each step's loss, mean loss, gradient
norm and token count through `DeviceReads` (a non-blocking copy into pinned memory, read once
the device has passed it) instead.

On the CPU, where a read costs nothing, `DeviceReads` takes the values as they are; the test
checks that nothing else in nexa_nb reads one: ``.item()``, ``float()``, ``int()`` and
``bool()`` all run ``aten._local_scalar_dense``, which a dispatch mode sees, and the Python
frames say whether nexa_nb's code made the call. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising call into an error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nexa_nb
from nexa_nb import events as ev

pytestmark = pytest.mark.slow

PACKAGE = str(Path(nexa_nb.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
STEPS, WARMUP, ACCUM, MICRO, SEQ = 12, 3, 2, 4, 6


class HostReads(TorchDispatchMode):
    """Notes ``file:line`` of every read of a tensor's value made by nexa_nb's own code."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = os.path.relpath(frame.f_code.co_filename, PACKAGE)
                self.reads.append(f"nexa_nb/{where}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


class Watched:
    """A ``Task.forward`` that runs ``model(**batch)`` and watches the steady steps.

    Forward ``start`` (the first of step ``WARMUP + 1``) switches the watch on; forward ``stop``
    (the first of the last step, whose end reads everything at once) switches it off and writes
    what it saw to ``<folder>/watched.json``. `HostReads` on the CPU; on a GPU, the sync debug
    mode set to "error", so that a synchronising call raises in the worker and fails the run.
    """

    def __init__(self, folder: Path, gpu: bool = False):
        self.folder, self.gpu = str(folder), gpu
        self.start, self.stop = WARMUP * ACCUM, (STEPS - 1) * ACCUM
        self.calls = 0
        self.mode: HostReads | None = None

    def __call__(self, model, batch):
        if self.calls == self.start:
            if self.gpu:
                torch.cuda.set_sync_debug_mode("error")
            else:
                self.mode = HostReads()
                self.mode.__enter__()
        if self.calls == self.stop:
            reads = []
            if self.gpu:
                torch.cuda.set_sync_debug_mode("default")
            else:
                self.mode.__exit__(None, None, None)
                reads = self.mode.reads
            Path(self.folder, "watched.json").write_text(json.dumps({"reads": reads}))
        self.calls += 1
        return model(**batch)


class Tagger(torch.nn.Module):
    """Token regression with padding: the loss counts the unmasked tokens only."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def forward(self, x, attention_mask, y):
        mask = attention_mask.float()
        error = (self.net(x).squeeze(-1) - y) ** 2 * mask
        return {"loss": error.sum() / mask.sum()}


def tagging_task(forward) -> nexa_nb.Task:
    """Sequences of SEQ tokens, the last 0-3 of them padding: a known token count per batch."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(STEPS * ACCUM * MICRO):
        x = torch.randn(SEQ, 8, generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - i % 4 :] = 0
        samples.append({"x": x, "attention_mask": mask, "y": x.sum(-1)})
    return nexa_nb.Task(Tagger, samples, forward=forward, name="tagger")


def run(tmp_path: Path, gpu: bool = False, **options):
    watched = Watched(tmp_path, gpu)
    sink = nexa_nb.events.RecordingSink()
    result = nexa_nb.train(
        tagging_task(watched),
        sinks=[sink],
        batch_size=MICRO,
        grad_accum=ACCUM,
        max_steps=STEPS,
        lr=0.01,
        output_dir=str(tmp_path / "model"),
        **options,
    )
    assert result.status == "completed", (result, result.error)
    seen = json.loads((tmp_path / "watched.json").read_text())
    return result, [e for e in sink.events if isinstance(e, ev.StepEnd)], seen


def test_steady_steps_read_no_tensor_from_nexa_nb_code_and_the_figures_still_arrive(tmp_path):
    """Fails on a loop that calls ``.item()`` on the loss, ``float()`` on the gradient norm or
    ``int()`` on the attention mask's sum at every step: it lists the lines that did."""
    result, steps, seen = run(tmp_path, force_cpu=True)

    assert seen["reads"] == []
    # Every step's figures still arrive, in order, each with the step it belongs to.
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    for e, h in zip(steps, result.history):
        assert e.loss == e.mean_loss == h["loss"] and e.loss > 0  # one process: its loss is the mean
        assert e.grad_norm is not None and e.grad_norm > 0 and e.grad_norm == h["grad_norm"]
        assert e.tokens_per_s is not None
    # The token count is the attention masks' sum: (SEQ - padding) over the step's samples.
    tokens = [round(e.tokens_per_s * e.accum_time_s) for e in steps]
    assert all(ACCUM * MICRO * (SEQ - 3) <= t <= ACCUM * MICRO * SEQ for t in tokens), tokens
    assert sum(tokens) == sum(SEQ - i % 4 for i in range(STEPS * ACCUM * MICRO))
    norms = [e.grad_norm for e in steps]
    assert steps[-1].mean_grad_norm == pytest.approx(sum(norms) / len(norms))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def _cuda_ready() -> bool:
    """A CUDA GPU and a CUDA build of torch, found without initialising CUDA in this process
    (the workers are forked from it)."""
    from nexa_nb.hardware import probe

    return bool(probe().gpus) and torch.backends.cuda.is_built()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of torch: the sync debug mode is CUDA's"
)
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_steady_steps_on_a_gpu_never_synchronise(tmp_path, precision):
    """Steady steps under ``torch.cuda.set_sync_debug_mode("error")``: a ``.item()``, a blocking
    copy or a stream synchronisation anywhere in the step path raises, and the run fails."""
    result, steps, _ = run(tmp_path, gpu=True, force_cpu=False, precision=precision)

    assert result.plan.device == "cuda"
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert all(e.grad_norm is not None and e.tokens_per_s for e in steps)
