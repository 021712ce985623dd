"""The engine, through the real launcher: real Accelerate and DeepSpeed runs on CPU processes."""

from __future__ import annotations

import pytest
import torch

import nexa_nb
from tests.conftest import regression_task, weights_dump_metric

pytestmark = pytest.mark.slow


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_with_accumulation_equal_one_process_with_the_whole_batch(tmp_path, quiet):
    task = regression_task(n=256, eval_n=8, metrics=weights_dump_metric(str(tmp_path)))
    one = nexa_nb.train(task, sinks=[quiet], batch_size=16, max_steps=8, lr=0.05)
    two = nexa_nb.train(task, sinks=[quiet], procs=2, batch_size=4, grad_accum=2, max_steps=8, lr=0.05)

    assert one.distributed_type == "NO" and one.num_processes == 1
    assert two.distributed_type == "MULTI_CPU" and two.num_processes == 2
    assert two.plan.effective_batch == one.plan.effective_batch == 16
    assert _max_diff(_weights(one), _weights(two)) < 1e-5
    assert two.losses == pytest.approx(one.losses, abs=1e-5)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert _max_diff(rank0, rank1) == 0.0


def _weights(result) -> dict:
    """The final weights, as the run wrote them into its model folder."""
    return result.trained_model().state_dict()


PLAIN_LOSSES: dict[int, list[float]] = {}


def _plain_losses(procs: int) -> list[float]:
    if procs not in PLAIN_LOSSES:
        from nexa_nb.events import RecordingSink

        PLAIN_LOSSES[procs] = nexa_nb.train(
            regression_task(), sinks=[RecordingSink()], procs=procs, max_steps=12, lr=0.02
        ).losses
    return PLAIN_LOSSES[procs]


ZERO_CASES = [
    pytest.param(dict(zero=0), id="zero0"),
    pytest.param(dict(zero=1), id="zero1"),
    pytest.param(dict(zero=2), id="zero2"),
    pytest.param(dict(zero=3), id="zero3"),
    pytest.param(dict(zero=3, offload_optimizer="cpu", offload_param="cpu"), id="zero3-offload"),
]


@pytest.mark.parametrize("procs", [1, 2])
@pytest.mark.parametrize("options", ZERO_CASES)
def test_zero_stages_train_and_follow_the_plain_run(options, procs, quiet):
    result = nexa_nb.train(regression_task(), sinks=[quiet], procs=procs, max_steps=12, lr=0.02, **options)

    assert result.distributed_type == "DEEPSPEED"
    assert result.num_processes == procs
    losses = result.losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    # fp32 ZeRO partitions the same arithmetic: it follows the plain run to float rounding.
    assert losses == pytest.approx(_plain_losses(procs), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param(dict(zero=2), id="zero2"),
        pytest.param(dict(zero=3, procs=2), id="zero3-2procs"),
        pytest.param(dict(dropout=0.3, procs=2, eval_every=5), id="dropout-eval-2procs"),
    ],
)
def test_resume_from_a_checkpoint_continues_the_same_loss_curve(options, tmp_path, quiet):
    """Resumed mid-epoch (16 steps an epoch), through an epoch boundary; with dropout, the
    masks after the resume are the ones the uninterrupted run drew."""
    options = dict(options)
    task = regression_task(n=128, eval_n=16 if "eval_every" in options else 0, dropout=options.pop("dropout", 0.0))
    common = dict(sinks=[quiet], max_steps=20, lr=0.02, batch_size=8, **options)
    full = nexa_nb.train(task, ckpt_dir=str(tmp_path / "full"), ckpt_every=10, **common)
    step10 = tmp_path / "full" / "step-0000010"
    assert (step10 / "nexa_state.json").is_file()

    resumed = nexa_nb.train(task, ckpt_dir=str(tmp_path / "resumed"), resume=str(step10), **common)

    assert [h["step"] for h in resumed.history] == list(range(1, 21))
    tolerance = 0.0 if not options else 1e-6
    assert resumed.losses[10:] == pytest.approx(full.losses[10:], abs=tolerance, rel=0)
    assert resumed.losses[:10] == full.losses[:10]  # carried over from the checkpoint


def test_resume_latest_picks_the_newest_complete_checkpoint(tmp_path, quiet):
    task = regression_task(n=128)
    nexa_nb.train(task, sinks=[quiet], max_steps=6, ckpt_dir=str(tmp_path), ckpt_every=3)
    torn = tmp_path / ".tmp-step-0000009"
    torn.mkdir()  # what a save killed half-way leaves behind
    (tmp_path / "step-0000012").mkdir()  # a folder without its state file is incomplete too

    result = nexa_nb.train(task, sinks=[quiet], max_steps=8, ckpt_dir=str(tmp_path), resume="latest")

    assert result.history[5]["step"] == 6 and len(result.history) == 8


def test_gradient_checkpointing_and_lora_on_a_plain_module(quiet):
    ref = nexa_nb.train(regression_task(), sinks=[quiet], max_steps=6, lr=0.02)
    ckpt = nexa_nb.train(regression_task(), sinks=[quiet], max_steps=6, lr=0.02, grad_ckpt=True)
    assert ckpt.losses == pytest.approx(ref.losses, abs=1e-6)  # recomputation changes memory, not maths

    lora = nexa_nb.train(regression_task(), sinks=[quiet], max_steps=30, lr=0.05, lora=True, lora_r=4)
    assert lora.losses[-1] < lora.losses[0]
    assert _weights(lora).keys() == _weights(ref).keys()  # adapters merged back into the base model


def test_events_reach_the_kernel_from_every_rank(quiet):
    from nexa_nb import events as ev

    nexa_nb.train(regression_task(), sinks=[quiet], procs=2, grad_accum=2, max_steps=4)
    steps = [e for e in quiet.events if isinstance(e, ev.StepEnd)]
    assert {e.rank for e in steps} == {0, 1}
    assert sorted(e.step for e in steps if e.rank == 0) == [1, 2, 3, 4]
    assert {1, 4} <= {e.step for e in steps if e.rank == 1}  # the other ranks: a few a second, and the last
    micro = [e for e in quiet.events if isinstance(e, ev.MicroStep) and e.rank == 0]
    assert (micro[0].step, micro[0].micro, micro[0].of) == (1, 1, 2)  # later ones at most 4 a second
    # rank 1 may report its first micro-step before rank 0 has announced the run
    kinds = [type(e) for e in quiet.events]
    assert kinds.index(ev.RunStarted) < kinds.index(ev.StepEnd) and kinds[-1] is ev.RunEnded
    assert steps[0].memory.host_rss > 0


def test_trackers_write_offline_tensorboard_logs(tmp_path, quiet):
    pytest.importorskip("tensorboard")
    nexa_nb.train(regression_task(), sinks=[quiet], max_steps=3, trackers=["tensorboard"], log_dir=str(tmp_path))
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_trackers_write_offline_mlflow_runs(tmp_path, quiet):
    pytest.importorskip("mlflow")
    nexa_nb.train(regression_task(), sinks=[quiet], max_steps=3, trackers=["mlflow"], log_dir=str(tmp_path))
    metrics = [p for p in tmp_path.rglob("metrics/*") if p.name.startswith("train")]
    assert metrics, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))[:20]


def test_the_mean_over_ranks_of_fast_steps_is_posted_in_groups_and_stays_exact(tmp_path, quiet):
    """Fast CPU steps share one all-reduce of their losses per group (about 0.25 s of steps);
    every step still gets its own mean, the groups line up on both ranks around the
    evaluations and saves that flush them, and the run ends."""
    from nexa_nb import events as ev
    from nexa_nb.engine.reporter import MeanOverRanks

    steps = 300
    task = regression_task(n=steps * 2 * 4, eval_n=8)
    result = nexa_nb.train(
        task,
        sinks=[quiet],
        procs=2,
        batch_size=4,
        max_steps=steps,
        eval_every=70,
        ckpt_dir=str(tmp_path),
        ckpt_every=110,
    )
    assert result.status == "completed" and [h["step"] for h in result.history] == list(range(1, steps + 1))
    ends = [e for e in quiet.events if isinstance(e, ev.StepEnd)]
    by_rank = {rank: {e.step: e for e in ends if e.rank == rank} for rank in (0, 1)}
    both = sorted(set(by_rank[0]) & set(by_rank[1]))
    assert steps in both and len(both) >= 2
    for step in both:
        local = (by_rank[0][step].loss + by_rank[1][step].loss) / 2
        assert by_rank[0][step].mean_loss == pytest.approx(local, rel=1e-6)
        assert result.history[step - 1]["loss"] == by_rank[0][step].mean_loss
    seconds = sum(e.accum_time_s for e in by_rank[0].values()) / steps
    assert seconds < MeanOverRanks.GROUP_SECONDS / 2  # fast enough that groups of several steps form
