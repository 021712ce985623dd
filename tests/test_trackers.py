"""Experiment trackers, offline, in 2 processes: what they hold is what the run logged."""

from __future__ import annotations

import json
import struct

import pytest

import nexa_nb
from tests.conftest import regression_task


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file (``run-ID.wandb``): a LevelDB-style log of
    protobuf records after a 7-byte header, in 32 KiB blocks; wandb itself has no offline reader."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32 * 1024, run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, rows = 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's trailer, too short for a record header
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_runs_offline_from_rank_0_and_holds_the_logged_losses(tmp_path, quiet, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = nexa_nb.train(
        regression_task(), sinks=[quiet], procs=2, max_steps=4, trackers=["wandb"], log_dir=str(tmp_path)
    )

    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # offline, and from rank 0 only
    rows = wandb_history(runs[0])
    assert [row["train/loss"] for row in rows if "train/loss" in row] == pytest.approx(result.losses, rel=1e-6)


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_trackers_close_without_ending_the_run_before_its_model_is_written(tracker, tmp_path, quiet):
    """Accelerate's end_training destroys the process group, which writing the final model of a
    2-process run still needs."""
    pytest.importorskip(tracker)
    result = nexa_nb.train(
        regression_task(), sinks=[quiet], procs=2, max_steps=2, trackers=[tracker], log_dir=str(tmp_path / "logs")
    )
    assert result.status == "completed" and result.model_dir is not None
