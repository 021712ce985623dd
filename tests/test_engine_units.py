"""The engine's parts on their own: batches, schedules, trackers, checkpoint state. No worker processes
except in the one end-to-end test at the bottom."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.api import prepare
from nexa_nb.config import resolve_config
from nexa_nb.engine.batches import cast_floats, count_tokens, default_forward
from nexa_nb.engine.checkpoints import STATE_FILE, check_resumable, read_checkpoint_state
from nexa_nb.engine.runtime import steps_per_epoch
from nexa_nb.engine.state import TrainState
from nexa_nb.errors import TrainingError
from nexa_nb.plan import make_plan
from nexa_nb.schedules import SCHEDULES
from nexa_nb.trackers import TRACKERS


class TokenModel(torch.nn.Module):
    """Takes what a transformers collator gives (input_ids, attention_mask, labels), returns .loss."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask, labels, scale=None):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        logits = self.head(hidden.mean(dim=1))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss if scale is None else loss * scale.mean()}


def token_samples(n: int = 32) -> list[dict[str, list[int] | int]]:
    return [{"input_ids": [1 + i % 7] * (2 + i % 3), "labels": i % 2} for i in range(n)]


def pad_collate(samples):
    """What DataCollatorWithPadding returns: a BatchEncoding (a UserDict), padded, with an attention mask."""
    from transformers import BatchEncoding

    width = max(len(s["input_ids"]) for s in samples)
    ids = [s["input_ids"] + [0] * (width - len(s["input_ids"])) for s in samples]
    mask = [[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples]
    return BatchEncoding(
        {"input_ids": ids, "attention_mask": mask, "labels": [s["labels"] for s in samples]}, tensor_type="pt"
    )


def test_a_batch_encoding_is_called_cast_and_counted_like_a_dict():
    batch = pad_collate(token_samples(4))
    batch["scale"] = torch.ones(4)
    assert not isinstance(batch, dict)

    assert default_forward(TokenModel(), batch)["loss"].dim() == 0
    cast = cast_floats(batch, torch.bfloat16)
    assert cast["scale"].dtype == torch.bfloat16 and cast["input_ids"].dtype == torch.long
    assert count_tokens(batch) == int(batch["attention_mask"].sum()) == 2 + 3 + 4 + 2


def test_the_kernel_accepts_a_batch_encoding_before_training():
    task = nexa_nb.Task(TokenModel(), token_samples(), collate_fn=pad_collate)
    plan = prepare(task, resolve_config(environ={}, arguments={"batch_size": 4, "max_steps": 2}))
    assert plan.micro_batch == 4


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


@pytest.mark.slow
def test_a_transformers_collator_batch_trains_and_counts_tokens(quiet):
    task = nexa_nb.Task(TokenModel, token_samples(), collate_fn=pad_collate)
    result = nexa_nb.train(task, sinks=[quiet], batch_size=4, max_steps=3)

    assert result.status == "completed" and len(result.losses) == 3
    steps = [e for e in quiet.events if isinstance(e, ev.StepEnd)]
    assert steps and all(e.tokens_per_s for e in steps)
