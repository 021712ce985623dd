"""The engine's parts on their own: schedules, trackers, checkpoint state; no worker processes. Batches, of
every kind a user brings, are tested in test_hf_data.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from nexa_nb.config import resolve_config
from nexa_nb.engine.checkpoints import STATE_FILE, check_resumable, read_checkpoint_state
from nexa_nb.engine.runtime import steps_per_epoch
from nexa_nb.engine.state import TrainState
from nexa_nb.errors import TrainingError
from nexa_nb.plan import make_plan
from nexa_nb.schedules import SCHEDULES
from nexa_nb.trackers import TRACKERS


def test_schedules_warm_up_then_follow_their_shape():
    for factor in SCHEDULES.values():
        assert [factor(s, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert SCHEDULES["constant"](7, 4, 10) == 1.0
    assert SCHEDULES["linear"](7, 4, 10) == pytest.approx(0.5)
    assert SCHEDULES["cosine"](7, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert SCHEDULES["linear"](20, 0, 10) == 0.0  # past the end: stays at the end's value
    assert SCHEDULES["cosine"](0, 0, 10) == 1.0


def test_mlflow_logs_offline_unless_the_user_chose_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    TRACKERS["mlflow"].prepare(str(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    TRACKERS["mlflow"].prepare(str(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    TRACKERS["tensorboard"].prepare(str(tmp_path))  # nothing to set up


def test_checkpoint_state_and_registries_need_no_torch():
    code = (
        "import sys, nexa_nb.engine.checkpoints, nexa_nb.engine.outcome, nexa_nb.schedules, nexa_nb.trackers; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_state_round_trips_through_the_state_file(tmp_path):
    plan = make_plan(resolve_config(environ={}, arguments={"zero": 2, "procs": 2, "batch_size": 4}))
    state = TrainState.start(plan, "task", {"params": 10, "digest": "abc"})
    state.step, state.history = 3, [{"step": 3, "loss": 0.5}]
    (tmp_path / STATE_FILE).write_text(json.dumps(state.to_dict()))

    read = read_checkpoint_state(tmp_path)
    assert read == state
    check_resumable(read, plan)
    with pytest.raises(TrainingError, match="resume with --procs 2"):
        check_resumable(read, make_plan(resolve_config(environ={}, arguments={"zero": 2, "batch_size": 4})))
    with pytest.raises(TrainingError, match="ZeRO stage 2, this run uses None"):
        check_resumable(read, make_plan(resolve_config(environ={}, arguments={"batch_size": 4})))


def test_too_little_data_for_one_step_is_refused_with_the_sums():
    plan = make_plan(resolve_config(environ={}, arguments={"procs": 2, "batch_size": 4, "grad_accum": 2}))
    assert steps_per_epoch(33, plan) == 2
    with pytest.raises(TrainingError, match=r"needs 16 samples \(micro-batch 4 x accumulation 2 x 2 procs\)"):
        steps_per_epoch(15, plan)
