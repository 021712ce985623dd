"""Run records: written while a run trains, read by anyone afterwards (`nexa_nb.runs`, `nexa_nb.attach`),
and the magics that read them (%nexa_runs, %nexa_attach)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import nexa_nb
from nexa_nb import api, overview, runs
from nexa_nb import events as ev
from nexa_nb.errors import TrainingError
from tests.conftest import regression_task


def step(rank: int, n: int, total: int = 100, loss: float = 1.0) -> ev.StepEnd:
    return ev.StepEnd(
        rank=rank,
        step=n,
        total_steps=total,
        loss=loss,
        lr=1e-3,
        grad_norm=0.5,
        samples_per_s=10.0,
        tokens_per_s=None,
        memory=ev.MemorySample(host_rss=2**20),
        mean_loss=loss,
    )


def writer(tmp_path: Path, name: str = "r") -> runs.RunWriter:
    plan = nexa_nb.make_plan(nexa_nb.resolve_config(arguments={"run_dir": str(tmp_path / name)}))
    return runs.RunWriter.create(plan, "regression")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Runs write their records under the test's own folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the record's format ------------------------------------------------------------------------


def test_a_reader_following_the_writer_sees_every_event_once_in_order(tmp_path):
    record = writer(tmp_path)
    sent = [[step(rank, n) for rank in (0, 1)] for n in range(1, 301)]
    done = threading.Event()

    def write():
        for batch in sent:
            record.write(batch)
        done.set()

    reader, seen = runs.Run(record.folder), []
    thread = threading.Thread(target=write)
    thread.start()
    while not done.is_set():
        seen += reader.new_events()
    thread.join()
    seen += reader.new_events()
    assert seen == [event for batch in sent for event in batch]


def test_a_torn_last_line_is_ignored_until_it_is_whole(tmp_path):
    record = writer(tmp_path)
    record.write([step(0, 1), step(0, 2)])
    line = json.dumps(runs.encode(step(0, 3))) + "\n"
    with open(record.folder / runs.EVENTS_FILE, "a") as f:
        f.write(line[:25])  # a writer killed in the middle of a line
    reader = runs.Run(record.folder)
    assert reader.events() == [step(0, 1), step(0, 2)]
    assert reader.new_events() == [step(0, 1), step(0, 2)]
    with open(record.folder / runs.EVENTS_FILE, "a") as f:
        f.write(line[25:])
    assert reader.new_events() == [step(0, 3)]


def test_two_runs_started_in_the_same_second_get_distinct_folders(in_tmp):
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
    folders = [runs.new_run_dir("my task", now=now) for _ in range(3)]
    assert [f.name for f in folders] == [
        "my_task-20261130-120000",
        "my_task-20261130-120000-2",
        "my_task-20261130-120000-3",
    ]
    assert all(f.is_dir() for f in folders)


def test_a_run_dir_holding_a_record_is_refused_before_anything_starts(tmp_path):
    writer(tmp_path)
    with pytest.raises(TrainingError, match=r"holds the record of another run; pass a new folder to --run-dir"):
        writer(tmp_path)


def test_the_record_holds_no_environment_values(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKER_API_TOKEN", "s3cr3t-t0ken-value")
    record = writer(tmp_path)
    record.handle(ev.Note("logged in with s3cr3t-t0ken-value"))
    record.finish({"status": "completed", "message": "s3cr3t-t0ken-value"})
    text = "".join(p.read_text() for p in record.folder.iterdir() if p.is_file())
    assert "s3cr3t-t0ken-value" not in text and "$TRACKER_API_TOKEN" in text
    assert "OMP_NUM_THREADS" not in text  # the plan's worker environment is left out


# --- runs in the kernel ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_writes_its_record_and_it_replays_into_any_sink(in_tmp):
    seen = ev.RecordingSink()
    result = nexa_nb.train(regression_task(), sinks=[seen], procs=2, max_steps=6, lr=0.02, eval_every=3)
    run = runs.Run(result.run_dir)
    assert Path(result.run_dir).parent == Path("nexa_runs")
    assert result.model_dir == f"{result.run_dir}/model"
    assert run.events() == seen.events  # what the cell's sinks saw, in their order
    replayed = ev.RecordingSink()
    run.replay([replayed])
    assert replayed.events == seen.events
    assert run.info()["plan"]["describe"] == result.plan.describe()
    assert sorted(Path(p).name for p in result.logs) == ["rank0.log", "rank1.log"]
    assert all(Path(p).is_file() for p in result.logs)

    again = api.attach(run.name)
    assert (again.status, again.losses, again.history) == ("completed", result.losses, result.history)
    assert again.plan.describe() == result.plan.describe() and again.model_dir == result.model_dir
    assert runs.history_of(run.events()) == result.history
    with pytest.raises(TrainingError, match=r"holds no task .* result.trained_model\(task=task\)"):
        again.trained_model()
    loaded = again.trained_model(task=regression_task())
    assert [p.tolist() for p in loaded.parameters()] == [p.tolist() for p in result.trained_model().parameters()]


@pytest.mark.slow
def test_attach_on_a_finished_run_draws_the_same_static_picture(in_tmp):
    from nexa_nb.sinks.dashboard import Dashboard

    live = Dashboard(refresh_interval=60)
    result = nexa_nb.train(regression_task(), sinks=[live], procs=2, max_steps=5, lr=0.02)
    later = Dashboard(refresh_interval=60)
    api.attach(Path(result.run_dir).name, [later])
    assert later.static_outputs() == live.static_outputs()
    assert 'data-status="completed"' in later.static_outputs()[0]["image/svg+xml"]


class FailsAtStep:
    """A loss that raises on rank 0 once `n` steps have run: a run that fails part way. Its steps
    are slow enough (0.3 s) for each one's loss to reach the kernel before the next."""

    def __init__(self, loss_fn, n: int):
        self.loss_fn, self.n, self.calls = loss_fn, n, 0

    def __call__(self, out, batch):
        time.sleep(0.3)
        self.calls += 1
        if self.calls > self.n and os.environ.get("RANK", "0") == "0":
            raise ValueError("the loss broke")
        return self.loss_fn(out, batch)


@pytest.mark.slow
def test_a_failed_run_has_a_record_and_a_result(in_tmp, shell):
    task = regression_task()
    task.loss_fn = FailsAtStep(task.loss_fn, 5)
    with pytest.raises(TrainingError, match="the loss broke"):
        nexa_nb.train(task, sinks=[], procs=2, max_steps=10, lr=0.02)
    failed = nexa_nb.last_result()
    assert failed.status == "failed" and "ValueError: the loss broke" in failed.error
    # the steps whose loss, averaged over ranks, reached the kernel before the failure
    steps = [h["step"] for h in failed.history]
    assert 1 <= len(steps) <= 5 and steps == list(range(1, len(steps) + 1))
    assert "ValueError: the loss broke" in failed.traceback
    assert sorted(Path(p).name for p in failed.logs) == ["rank0.log", "rank1.log"]

    name = Path(failed.run_dir).name
    shell.run_line_magic("config", "NexaMagics.dashboard = False")
    try:
        again = shell.run_line_magic("nexa_attach", name)
    finally:
        shell.run_line_magic("config", "NexaMagics.dashboard = True")
    assert (again.status, again.error, again.history) == ("failed", failed.error, failed.history)
    table = overview.runs_table()
    row = next(line for line in table.splitlines() if name in line)
    assert "failed" in row and "/10" in row


@pytest.mark.slow
def test_attach_follows_a_live_run_until_it_ends(in_tmp):
    task = regression_task(n=512)
    base = task.loss_fn

    def slow(out, batch):
        time.sleep(0.05)
        return base(out, batch)

    task.loss_fn = slow
    results = []
    thread = threading.Thread(target=lambda: results.append(nexa_nb.train(task, sinks=[], max_steps=40, lr=0.02)))
    thread.start()
    while not list(Path("nexa_runs").glob("*/run.json")):
        time.sleep(0.02)
    folder = next(Path("nexa_runs").glob("*/run.json")).parent

    lags = []

    class Lag(ev.Sink):
        """How long after its write each step is seen: the record's mtime is the last write."""

        def on_step_end(self, event):
            lags.append(time.time() - (folder / runs.EVENTS_FILE).stat().st_mtime)

    followed = api.attach(folder.name, [Lag()])
    thread.join()
    assert followed.losses == results[0].losses and len(lags) == 40
    assert runs.Run(folder).status() == "completed"
    assert max(lags) < 1.0


def test_a_run_whose_process_is_gone_is_lost_and_attach_says_so(tmp_path):
    record = writer(tmp_path)
    record.write([ev.RunStarted({}, 10, 1, "NO"), step(0, 1, 10), ev.CheckpointSaved(1, "ckpt/step-0000001")])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = json.loads((record.folder / runs.RUN_FILE).read_text())
    record.write_json(runs.RUN_FILE, {**info, "pid": int(gone.stdout)})
    seen = ev.RecordingSink()
    assert runs.Run(record.folder).status() == "lost"
    with pytest.raises(TrainingError, match=r"stopped without an end.*its last checkpoint: ckpt/step-0000001"):
        api.attach(record.folder, [seen])
    assert seen.events[-1].status == "failed"


# --- the magics ----------------------------------------------------------------------------------


def usage_error(shell, magic: str, line: str) -> str:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic(magic, line)
    return str(caught.value)


def test_attach_to_a_run_that_does_not_exist_is_one_line(shell, in_tmp, capsys):
    message = usage_error(shell, "nexa_attach", "no-such-run")
    assert message.startswith("no run record named 'no-such-run'") and "%nexa_runs" in message
    assert "\n" not in message and capsys.readouterr().out == ""


def test_runs_lists_nothing_before_the_first_run(shell, in_tmp, capsys):
    shell.run_line_magic("nexa_runs", "")
    assert capsys.readouterr().out == "no runs recorded in nexa_runs/\n"


def test_compare_draws_each_run_on_one_chart(shell, in_tmp):
    for name, loss in (("lr-high", 2.0), ("lr-low", 1.0)):
        record = writer(in_tmp / "nexa_runs", name)
        record.write([ev.RunStarted({}, 3, 1, "NO"), *(step(0, n, 3, loss / n) for n in (1, 2, 3))])
        record.write([ev.EvalEnd(3, {"eval_loss": loss})])
    svg = overview.compare_svg(["lr-high", "lr-low"])
    for name in ("lr-high", "lr-low"):
        assert f'<polyline class="nexa-compare-loss" data-run="{name}" data-points="3"' in svg
        assert f'<polyline class="nexa-compare-eval" data-run="{name}" data-points="1"' in svg
    shell.run_line_magic("nexa_runs", "--compare lr-high lr-low")  # displays the same picture
    assert "no run record named 'lr-none'" in usage_error(shell, "nexa_runs", "--compare lr-high lr-none")
