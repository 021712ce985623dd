"""Slurm jobs from the notebook (``--slurm SPEC``), on a real one-node cluster this test starts
(Debian's slurm-wlm and munge, `tests/slurm_cluster.py`), submitted with submitit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import nexa_nb
from nexa_nb import events as ev
from nexa_nb import runs
from tests import slurm_cluster
from tests.conftest import regression_task


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def usage_error(shell, line: str) -> str:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic("nexa_train", line)
    return str(caught.value)


# --- bad specs: one line, nothing started or written ---------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("partition", "'partition' is not key=value"),
        ("partition=debug,colour=blue", "'colour' is not a --slurm key; the keys are partition, nodes"),
        ("time=soon", "time='soon' is not a whole number (the time limit in minutes)"),
        ("nodes=2", "a job trains on one node (nodes=1)"),
    ],
)
def test_a_malformed_spec_is_one_line(shell, in_tmp, spec, words):
    shell.user_ns["task"] = regression_task()
    message = usage_error(shell, f"--slurm {spec} --max-steps 2")
    assert message.startswith("slurm: ") and words in message and "Fix: write KEY=VALUE pairs" in message
    assert not (in_tmp / "nexa_runs").exists()


def test_shell_text_in_a_spec_is_refused_and_runs_nothing(shell, in_tmp):
    shell.user_ns["task"] = regression_task()
    touched = in_tmp / "x"
    message = usage_error(shell, f"--slurm 'partition=debug;touch {touched}' --max-steps 2")
    assert f"partition='debug;touch {touched}' is not a name (letters, digits, _ . - only)" in message
    assert not touched.exists() and not (in_tmp / "nexa_runs").exists()
    with pytest.raises(nexa_nb.ConfigError, match="is not a name"):
        nexa_nb.train(regression_task(), slurm={"partition": "debug$(touch x)"})
    assert not touched.exists() and list(in_tmp.iterdir()) == []


def test_slurm_where_it_is_not_installed_names_the_fix(shell, in_tmp, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch there
    shell.user_ns["task"] = regression_task()
    message = usage_error(shell, "--slurm partition=debug --max-steps 2")
    assert message.startswith("Slurm is not installed here (no sbatch on PATH). Fix: ")
    assert "apt-get install slurm-client" in message and not (in_tmp / "nexa_runs").exists()


# --- jobs on a real cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as why:
        pytest.skip(str(why))
    try:
        import submitit  # noqa: F401
    except ImportError:
        started.stop()
        pytest.skip("submitit is not installed (pip install submitit)")
    yield started
    started.stop()
    os.environ.pop("SLURM_CONF", None)


@pytest.mark.slow
def test_a_zero2_job_gives_the_in_kernel_losses(cluster, in_tmp):
    options = {"procs": 2, "zero": 2, "max_steps": 5, "lr": 0.02, "seed": 3}
    job = nexa_nb.train(regression_task(), slurm="partition=debug,cpus_per_task=2,time=10", **options)
    assert job.job and runs.Run(job.run_dir).info()["where"] == f"slurm job {job.job}"
    followed = job.result()
    here = nexa_nb.train(regression_task(), sinks=[], **options)
    assert (followed.status, followed.distributed_type) == ("completed", "DEEPSPEED")
    assert followed.losses == pytest.approx(here.losses, abs=1e-6)
    assert list((Path(job.run_dir) / "logs" / "slurm").glob("*_submission.sh"))  # submitit's sbatch script


@pytest.mark.slow
def test_stop_ends_a_long_job_keeping_a_checkpoint_that_resumes_in_the_kernel(cluster, in_tmp, shell):
    task = regression_task(n=512)
    base = task.loss_fn

    def slow(out, batch):
        time.sleep(0.1)
        return base(out, batch)

    task.loss_fn = slow
    ckpt = in_tmp / "ckpt"
    job = nexa_nb.train(
        task, slurm={"partition": "debug", "time": 10}, max_steps=1000, ckpt_dir=str(ckpt), ckpt_every=3
    )
    run = runs.Run(job.run_dir)
    while not any(isinstance(e, ev.CheckpointSaved) for e in run.events()):
        assert run.status() in ("pending", "running")
        time.sleep(0.5)
    shell.run_line_magic("nexa_stop", run.name)
    stopped = job.result()
    assert stopped.status == "interrupted" and Path(stopped.checkpoint_dir).parent == ckpt
    deadline = time.monotonic() + 60
    while runs.Run(job.run_dir).status() != "interrupted" or slurm_job_listed(job.job):
        assert time.monotonic() < deadline, "the job did not leave the queue"
        time.sleep(0.5)
    resumed = nexa_nb.train(regression_task(n=512), sinks=[], max_steps=8, ckpt_dir=str(ckpt), resume="latest")
    started = next(e for e in runs.Run(resumed.run_dir).events() if isinstance(e, ev.RunStarted))
    assert started.start_step == int(stopped.checkpoint_dir.rsplit("-", 1)[1]) > 0
    assert resumed.status == "completed"


def slurm_job_listed(job: str) -> bool:
    from nexa_nb.slurm import job_state

    return bool(job_state(job))


def test_export_with_slurm_writes_an_sbatch_script_from_the_parsed_spec(in_tmp):
    from nexa_nb.export import export_script

    config = nexa_nb.resolve_config(arguments={"max_steps": 3, "slurm": "partition=debug,cpus_per_task=2,time=30"})
    files = export_script(regression_task(), config, in_tmp / "train.py")
    sbatch = (in_tmp / "train.sbatch").read_text().splitlines()
    assert [line for line in sbatch if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=nexa",
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --time=30",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --output=train.%j.out",
    ]
    assert sbatch[-1] == files.command and "sbatch " in files.explanation
    with pytest.raises(nexa_nb.ConfigError, match="is not a name"):
        nexa_nb.resolve_config(arguments={"slurm": "partition=debug\n#SBATCH --uid=0"})


@pytest.mark.slow
def test_the_exported_sbatch_script_trains_on_the_cluster(cluster, in_tmp):
    import subprocess

    from nexa_nb.export import export_script

    config = nexa_nb.resolve_config(arguments={"max_steps": 3, "slurm": "partition=debug,time=10"})
    export_script(regression_task(), config, in_tmp / "train.py")
    submitted = subprocess.run(["sbatch", "--parsable", "train.sbatch"], cwd=in_tmp, capture_output=True, text=True)
    job = submitted.stdout.strip()
    assert submitted.returncode == 0 and job.isdigit(), submitted.stderr
    deadline = time.monotonic() + 300
    while slurm_job_listed(job):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    output = (in_tmp / f"train.{job}.out").read_text()
    assert "completed at step 3" in output and "trained model written to" in output
