"""The first DeepSpeed run on a machine compiles ops; the live view says so before the wait."""

from __future__ import annotations

import os
import re

import pytest

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.config import resolve_config
from nexa_nb.hardware import Gpu, Hardware
from nexa_nb.op_builds import check_cuda_arch_list, check_nvme_offload, compile_note, ops_a_plan_loads
from nexa_nb.plan import make_plan
from nexa_nb.settings import ConfigError
from tests.conftest import regression_task

GIB = 2**30
CPU = Hardware(cpu_cores=2, host_memory_bytes=16 * GIB, host_available_bytes=12 * GIB)
GPU = Hardware(gpus=(Gpu("NVIDIA H100", 80 * GIB, 9.0),), cpu_cores=16, host_memory_bytes=256 * GIB)


def plan(hardware=CPU, **arguments):
    return make_plan(resolve_config(environ={}, arguments=arguments), hardware)


@pytest.mark.parametrize(
    "hardware, arguments, ops",
    [
        (CPU, {}, []),
        (CPU, {"procs": 2}, []),
        (CPU, {"zero": 2}, ["deepspeed_shm_comm"]),
        (CPU, {"zero": 3, "offload": "cpu"}, ["deepspeed_shm_comm", "cpu_adam"]),
        (
            CPU,
            {"zero": 3, "offload_optimizer": "nvme", "nvme_path": "/tmp"},
            ["deepspeed_shm_comm", "cpu_adam", "async_io"],
        ),
        (GPU, {"zero": 2}, []),
    ],
)
def test_the_ops_a_plan_loads(hardware, arguments, ops):
    assert ops_a_plan_loads(plan(hardware, **arguments)) == ops


def test_a_built_op_is_not_announced(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    zero = plan(zero=2)
    assert "communication op" in compile_note(zero)
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    assert compile_note(zero) is None


def test_the_first_zero_run_says_it_compiles_before_it_does_and_the_next_does_not(tmp_path, monkeypatch, quiet):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    task = regression_task(n=64)
    nexa_nb.train(task, zero=2, procs=1, max_steps=2, batch_size=8, sinks=[quiet])
    first, started = quiet.events[0], next(e for e in quiet.events if isinstance(e, ev.RunStarted))
    assert isinstance(first, ev.Note) and "compiles its CPU communication op" in first.message
    assert quiet.events.index(first) < quiet.events.index(started)
    assert (tmp_path / "extensions" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()

    again = ev.RecordingSink()
    nexa_nb.train(task, zero=2, procs=1, max_steps=2, batch_size=8, sinks=[again])
    assert not [e for e in again.events if isinstance(e, ev.Note) and "compiles" in e.message]


def test_the_dashboard_shows_the_compile_note_before_the_run_starts(tmp_path, monkeypatch):
    from nexa_nb.sinks import Dashboard

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    board = Dashboard(refresh_interval=60)
    board.handle(ev.Note(compile_note(plan(zero=3, offload="cpu"))))
    board.flush()
    assert "compiles its CPU communication op and its CPU Adam optimizer" in board.status_view.value


def deepspeed_reads(arch_list: str, monkeypatch) -> bool:
    """Whether DeepSpeed's own async I/O builder turns `arch_list` into nvcc flags (no GPU needed)."""
    from deepspeed.ops.op_builder.async_io import AsyncIOBuilder

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)  # the builder rewrites it; monkeypatch restores it
    try:
        return bool(AsyncIOBuilder().compute_capability_args())
    except ValueError:
        return False


def test_nvme_offload_on_a_gpu_refuses_an_arch_list_deepspeed_cannot_read(tmp_path, monkeypatch):
    """Images built for Hopper set TORCH_CUDA_ARCH_LIST with "9.0a"; DeepSpeed's build of the async
    I/O op then dies in the worker with "invalid literal for int() with base 10: '0a'". The plan is
    refused in the kernel instead, with a list DeepSpeed reads."""
    nvme = plan(GPU, zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path))
    assert not deepspeed_reads("8.0 9.0a", monkeypatch)

    with pytest.raises(ConfigError) as refused:
        check_nvme_offload(nvme, environ={"TORCH_CUDA_ARCH_LIST": "8.0 9.0a"})

    message = str(refused.value)
    assert "\n" not in message and message.startswith("offload_optimizer: ") and "9.0a" in message
    fixed = re.search(r'os.environ\["TORCH_CUDA_ARCH_LIST"\] = "([^"]+)"', message).group(1)
    assert fixed == "8.0 9.0" and deepspeed_reads(fixed, monkeypatch)
    assert "--offload cpu" in message and os.listdir(tmp_path) == []


@pytest.mark.parametrize("arch_list", ["9.0", "8.0;9.0+PTX", "7.5 8.6 9.0+PTX"])
def test_plain_arch_lists_pass_as_deepspeed_reads_them(arch_list, monkeypatch):
    check_cuda_arch_list(arch_list, "offload_optimizer")
    assert deepspeed_reads(arch_list, monkeypatch)


def test_the_arch_list_matters_only_to_gpu_workers(tmp_path):
    """On a CPU machine DeepSpeed builds the op without nvcc: the same list is not refused there."""
    cpu_nvme = plan(zero=3, offload_optimizer="nvme", nvme_path=str(tmp_path))
    try:
        check_nvme_offload(cpu_nvme, environ={**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0a"})
    except ConfigError as refused:  # only the libaio probe may refuse here
        assert "TORCH_CUDA_ARCH_LIST" not in str(refused) and "libaio" in str(refused)
