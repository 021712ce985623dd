"""ZeRO-3 with the optimizer state and the parameters offloaded to NVMe (here, a temporary
folder on the machine's disk, through DeepSpeed's async I/O op and libaio)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nexa_nb
from nexa_nb.config import ConfigError
from nexa_nb.events import RecordingSink
from tests.conftest import regression_task

pytestmark = pytest.mark.slow
needs_libaio = pytest.mark.skipif(
    not Path("/usr/include/libaio.h").exists(),
    reason="NVMe offload needs libaio's headers: apt-get install libaio-dev (make test installs it as root)",
)


def wide_task(**options):
    """DeepSpeed keeps tensors under 1 MiB in memory: this model's first layer (2 MiB) is swapped."""
    return regression_task(dim=512, hidden=1024, **options)


def plain_losses(procs: int) -> list[float]:
    return nexa_nb.train(wide_task(), sinks=[RecordingSink()], procs=procs, max_steps=12, lr=0.02).losses


@needs_libaio
@pytest.mark.parametrize(
    "procs, offload",
    [
        pytest.param(1, dict(offload_optimizer="nvme"), id="optimizer-1proc"),
        pytest.param(2, dict(offload_optimizer="nvme", offload_param="nvme"), id="optimizer-and-params-2procs"),
    ],
)
def test_nvme_offload_follows_the_plain_run(procs, offload, tmp_path, quiet):
    result = nexa_nb.train(
        wide_task(), sinks=[quiet], procs=procs, max_steps=12, lr=0.02, zero=3, nvme_path=str(tmp_path), **offload
    )

    assert result.distributed_type == "DEEPSPEED" and result.status == "completed"
    swapped = [name for _, _, names in os.walk(tmp_path) for name in names if name.endswith(".tensor.swp")]
    assert swapped, "DeepSpeed swapped nothing to the NVMe folder"
    # fp32 arithmetic, moved to disk and back: the plain run's losses to float rounding.
    assert result.losses == pytest.approx(plain_losses(procs), rel=1e-4, abs=1e-5)


@needs_libaio
def test_a_run_offloaded_to_nvme_resumes_from_its_checkpoint(tmp_path, quiet):
    """DeepSpeed 0.19 restores, on resume, the optimizer tensors it swapped to disk (1 MiB or
    more) but not the state of the smaller ones it kept in memory (it skips the optimizer
    checkpoint under NVMe offload): the first resumed step is the uninterrupted run's, later
    ones depart from it, and the plan says so."""
    task = wide_task(n=128)
    common = dict(
        sinks=[quiet], max_steps=12, lr=0.002, batch_size=8, zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path)
    )
    full = nexa_nb.train(task, ckpt_dir=str(tmp_path / "full"), ckpt_every=6, **common)

    resumed = nexa_nb.train(
        task, ckpt_dir=str(tmp_path / "resumed"), resume=str(tmp_path / "full/step-0000006"), **common
    )

    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert resumed.losses[6] == pytest.approx(full.losses[6], rel=1e-6)  # the restored weights
    assert resumed.losses[7:] == pytest.approx(full.losses[7:], rel=0.2)  # the same run, not an exact one
    assert any("1 MiB" in note for note in resumed.plan.notes)


def test_nvme_offload_is_refused_before_any_worker_when_async_io_cannot_be_built(tmp_path, monkeypatch, quiet):
    """DeepSpeed compiles a test program against libaio before it loads the op; here the C
    compiler is one that always fails, as a machine without libaio's headers fails that test."""
    monkeypatch.setenv("CC", "false")
    with pytest.raises(ConfigError) as refused:
        nexa_nb.train(
            regression_task(),
            sinks=[quiet],
            zero=3,
            offload_optimizer="nvme",
            nvme_path=str(tmp_path),
            ckpt_dir=str(tmp_path / "ckpt"),
        )

    message = str(refused.value)
    assert "\n" not in message and "libaio-dev" in message and "--offload cpu" in message
    assert quiet.events == [] and os.listdir(tmp_path) == []
