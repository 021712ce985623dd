"""One regression test per upstream pitfall the launcher handles (numbers as in upstream-pitfalls.md).

Each test runs the real notebook launcher, Accelerate and DeepSpeed on CPU processes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.errors import TrainingError
from tests.conftest import regression_task, weights_dump_metric

pytestmark = pytest.mark.slow


def test_pitfall_01_cpu_processes_are_synchronised_not_copies(tmp_path, quiet):
    """notebook_launcher + plain Accelerator() on a CPU host trains N unsynchronised copies."""
    task = regression_task(eval_n=8, metrics=weights_dump_metric(str(tmp_path)))
    result = nexa_nb.train(task, sinks=[quiet], procs=2, max_steps=5, lr=0.05)

    assert result.distributed_type == "MULTI_CPU" and result.num_processes == 2
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_pitfall_02_plain_cpu_plan_asks_accelerate_for_cpu_processes():
    """Accelerator(cpu=True) is the correct multi-CPU setup; the plan uses it only without DeepSpeed."""
    from nexa_nb.config import resolve_config
    from nexa_nb.plan import make_plan

    plain = make_plan(resolve_config(arguments={"procs": 2, "force_cpu": True}))
    zero = make_plan(resolve_config(arguments={"procs": 2, "zero": 2, "force_cpu": True}))
    assert plain.accelerator_kwargs["cpu"] is True
    assert zero.accelerator_kwargs["cpu"] is False


@pytest.mark.parametrize("procs", [1, 2])
def test_pitfall_03_deepspeed_is_not_dropped_on_a_cpu_host(procs, quiet):
    """Accelerator(cpu=True, deepspeed_plugin=...) silently runs MULTI_CPU without ZeRO."""
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=procs, zero=2, max_steps=3)
    assert result.distributed_type == "DEEPSPEED"


def test_pitfall_04_deepspeed_world_size_agrees_with_accelerate(quiet):
    """Without cpu=True, 2 DeepSpeed workers failed: train_batch_size 32 != 16 * 2 * 2."""
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, zero=2, batch_size=16, grad_accum=2, max_steps=2)
    assert result.num_processes == 2
    assert result.plan.deepspeed_config["train_batch_size"] == 16 * 2 * 2


def test_pitfall_05_worker_events_and_result_reach_the_kernel(quiet):
    """Results do not come back from notebook_launcher workers by themselves."""
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, max_steps=3)
    ranks = {e.rank for e in quiet.events if isinstance(e, ev.StepEnd)}
    assert ranks == {0, 1}
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert result.model_dir is not None and os.path.isdir(result.model_dir)


def test_pitfall_06_an_accelerator_made_in_the_kernel_is_refused_with_the_fix(quiet):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    Accelerator(cpu=True)
    try:
        with pytest.raises(TrainingError, match="restart the kernel and remove Accelerator"):
            nexa_nb.train(regression_task(), sinks=[quiet], procs=2, max_steps=1)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def test_pitfall_06_cuda_initialised_in_the_kernel_is_refused(monkeypatch, quiet):
    """Any import that initialises CUDA in the kernel breaks the fork; nexa_nb refuses before forking."""
    from nexa_nb import launch

    monkeypatch.setattr(launch, "cuda_initialised_in_this_process", lambda: True)
    with pytest.raises(TrainingError, match="CUDA is already initialised in this kernel.*restart the kernel"):
        nexa_nb.train(regression_task(), sinks=[quiet], procs=2, max_steps=1)
    assert not quiet.events  # nothing started


def test_pitfall_06_one_cpu_worker_may_be_forked_after_cuda_initialised(monkeypatch, quiet):
    """A CPU worker never touches CUDA: one of them trains (a GPU worker is refused: tests/test_gpu.py)."""
    from nexa_nb import launch

    monkeypatch.setattr(launch, "cuda_initialised_in_this_process", lambda: True)
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=1, max_steps=2)
    assert result.status == "completed"


def test_pitfall_06_rerun_does_not_meet_address_already_in_use(quiet):
    """A re-run can meet 'address already in use': a free port is taken for each launch."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 29500))  # accelerate's default port, held by someone else
        blocker.listen()
        first = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, max_steps=2)
        second = nexa_nb.train(regression_task(), sinks=[quiet], procs=2, max_steps=2)
    assert first.losses == second.losses


def test_pitfall_07_deepspeed_in_one_process_needs_no_launcher_and_leaves_the_kernel_clean(quiet):
    """deepspeed.initialize without launcher variables fell into MPI discovery (mpi4py)."""
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")}
    result = nexa_nb.train(regression_task(), sinks=[quiet], zero=3, max_steps=3)
    assert result.distributed_type == "DEEPSPEED" and result.num_processes == 1
    assert {k: os.environ.get(k) for k in before} == before
    assert not torch.distributed.is_initialized()
    # and a multi-process run right after, in the same kernel, works
    assert nexa_nb.train(regression_task(), sinks=[quiet], procs=2, zero=2, max_steps=2).num_processes == 2


def test_pitfall_09_bf16_deepspeed_gets_its_float_inputs_cast(quiet):
    """A bf16 DeepSpeed engine does not autocast: float32 inputs failed with a dtype mismatch."""
    result = nexa_nb.train(regression_task(), sinks=[quiet], zero=2, precision="bf16", max_steps=3)
    assert result.plan.precision == "bf16" and len(result.losses) == 3


def test_pitfall_11_fp16_on_a_cpu_host_says_what_ran(quiet):
    """Accelerator(mixed_precision="fp16") on a CPU host reports fp16 and raises nothing."""
    result = nexa_nb.train(regression_task(), sinks=[quiet], precision="fp16", max_steps=2, force_cpu=True)
    started = next(e for e in quiet.events if isinstance(e, ev.RunStarted))
    assert result.plan.precision == "bf16"
    assert started.plan_summary["precision"] == "bf16"
    assert [n for n in started.notes if "fp16" in n] == [
        "fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead"
    ]
    with pytest.raises(nexa_nb.ConfigError, match="strict"):
        nexa_nb.train(regression_task(), sinks=[quiet], precision="fp16", strict=True, force_cpu=True)


def test_a_kernel_that_ran_multithreaded_torch_can_still_fork_workers(tmp_path):
    """GNU OpenMP is not fork-safe: after a multi-threaded matmul in the kernel, a forked worker
    waited forever in its first parallel region. Run in a fresh interpreter with 2 threads."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, nexa_nb
        from nexa_nb.events import RecordingSink
        from tests.conftest import regression_task
        torch.set_num_threads(2)
        torch.randn(512, 256) @ torch.randn(256, 1024)  # starts the kernel's OpenMP pool
        result = nexa_nb.train(regression_task(), sinks=[RecordingSink()], max_steps=3, force_cpu=True)
        print(result.status)
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.stdout.strip().splitlines()[-1] == "completed", done.stderr[-2000:]


def _noisy_model():
    """Writes what a compiler or C++ code would (straight to descriptor 2), and prints from Python."""
    os.write(2, b"native noise from a worker\n")
    print("python print from a worker", flush=True)
    return torch.nn.Linear(8, 1)


@pytest.mark.parametrize("procs", [1, 2])
def test_workers_native_output_goes_to_a_log_python_prints_still_show(procs, capfd, quiet):
    task = regression_task()
    task = nexa_nb.Task(_noisy_model, task.train_data, loss_fn=task.loss_fn)
    nexa_nb.train(task, sinks=[quiet], procs=procs, max_steps=2)

    out, err = capfd.readouterr()
    assert "native noise" not in out + err
    assert out.count("python print from a worker") == procs


def test_a_killed_worker_error_names_its_log(quiet):
    def model():
        os.write(2, b"last words before the kill\n")
        os.kill(os.getpid(), 9)

    task = regression_task()
    with pytest.raises(TrainingError, match=r"(?s)rank 0 killed by SIGKILL.*rank\*\.log.*last words before the kill"):
        nexa_nb.train(nexa_nb.Task(model, task.train_data, loss_fn=task.loss_fn), sinks=[quiet], max_steps=2)


class _WithUnusedHead(torch.nn.Module):
    """A model whose `pooler` takes no part in the loss, as a transformers encoder's often does."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(8, 1)
        self.pooler = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


def test_ddp_unused_parameters_are_named_with_the_fix_and_the_option_trains(quiet):
    task = regression_task()
    task = nexa_nb.Task(_WithUnusedHead, task.train_data, loss_fn=task.loss_fn)
    with pytest.raises(
        TrainingError,
        match=r"take no part in the loss.*pooler\.weight, pooler\.bias\. "
        r"Fix: .*--find-unused-parameters",
    ):
        nexa_nb.train(task, sinks=[quiet], procs=2, max_steps=3)

    result = nexa_nb.train(task, sinks=[quiet], procs=2, max_steps=3, find_unused_parameters=True)
    assert result.status == "completed" and result.distributed_type == "MULTI_CPU"
