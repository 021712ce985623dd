"""Experiment trackers the engine can log to through Accelerate, all offline by default.

No torch here, and nothing of nexa_nb: the config lists the choices from `TRACKERS`. A new
tracker is one entry: the package it needs and what a worker sets up before Accelerate
starts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _nothing(project_dir: str) -> None:
    pass


def _offline_mlflow(project_dir: str) -> None:
    """Offline unless the user points MLflow at a server: a file store beside the other logs."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = (Path(project_dir).absolute() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no SQL store


def _offline_wandb(project_dir: str) -> None:
    """Offline unless the user chose a mode (``WANDB_MODE``): runs go under the project folder
    (``wandb sync`` uploads them later), and wandb's banners stay out of the cell."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(Path(project_dir).absolute()))
    os.environ.setdefault("WANDB_SILENT", "true")


@dataclass(frozen=True)
class Tracker:
    package: str
    """What pip installs for it (in nexa_nb's `extra`)."""
    extra: str = "trackers"
    prepare: Callable[[str], None] = _nothing
    """Run in every worker before the Accelerator is built, with the trackers' project folder."""


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker(package="tensorboard"),
    "mlflow": Tracker(package="mlflow-skinny", prepare=_offline_mlflow),
    "wandb": Tracker(package="wandb", prepare=_offline_wandb),
}
