"""A training step reuses the host memory the previous step freed (no page faults per step).

Without the engine's setting of glibc's allocator the count depends on the heap the worker
inherited from its parent: we saw 1,200 to 5,000 faults per step in a fresh process's first
runs and a handful in others, so no control run can force the bad case here."""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path

import pytest
import torch

import nexa_nb
from nexa_nb.engine.host_memory import keep_freed_memory

pytestmark = pytest.mark.slow

STEPS, WARMUP = 30, 10


class FaultCounter:
    """A forward that notes the process's minor page faults before each step and writes them
    to `path` after the last one."""

    def __init__(self, path: Path):
        self.path, self.faults = str(path), []

    def __call__(self, model, batch):
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        if len(self.faults) == STEPS:
            Path(self.path).write_text(json.dumps(self.faults))
        return model(batch[0])


def mlp() -> torch.nn.Module:
    # 1.3 M parameters: its weights, gradients and Adam's temporaries are megabytes each, above
    # glibc's initial mmap threshold (128 KiB).
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1))


def faults_per_step(tmp_path: Path, forward: FaultCounter) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 32, 256, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    task = nexa_nb.Task(
        mlp, data, loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[1]), forward=forward
    )
    result = nexa_nb.train(task, procs=1, batch_size=32, max_steps=STEPS, run_dir=str(tmp_path / "run"))
    assert result.status == "completed"
    counts = json.loads(Path(forward.path).read_text())
    return statistics.median(b - a for a, b in zip(counts[WARMUP:], counts[WARMUP + 1 :]))


@pytest.mark.skipif(not keep_freed_memory(), reason="the C library is not glibc")
def test_steps_reuse_the_memory_the_previous_step_freed(tmp_path):
    steady = faults_per_step(tmp_path, FaultCounter(tmp_path / "engine.json"))
    assert steady < 100, f"{steady} minor page faults per step"
