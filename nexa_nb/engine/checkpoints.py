"""Checkpoint folders: atomic saves, finding the newest complete one, and resuming from it.

No torch or Accelerate import here: the kernel checks a resume before any worker starts,
and the accelerator that saves or loads is passed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from nexa_nb.engine.state import TrainState
from nexa_nb.errors import TrainingError

if TYPE_CHECKING:
    from nexa_nb.config import TrainConfig
    from nexa_nb.plan import Plan

STATE_FILE = "nexa_state.json"
"""Written last into a checkpoint folder: a folder without it is incomplete."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first. A folder without its state file is a torn save."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_checkpoint_state(path: str | os.PathLike) -> TrainState:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise TrainingError(
            f"{path} is not a complete nexa_nb checkpoint (no {STATE_FILE}); "
            "pass a folder written by a finished save, or --resume latest"
        )
    try:
        return TrainState.from_dict(json.loads(state_file.read_text()))
    except json.JSONDecodeError:
        raise TrainingError(f"{state_file} is corrupt; resume from an earlier checkpoint") from None


def save_checkpoint(accelerator, ckpt_dir: str, state: TrainState) -> str:
    """Save atomically: write into a temporary folder, then rename it into place.

    An interrupted save leaves only a ``.tmp-`` folder, which is never taken by resume.
    """
    final = Path(ckpt_dir) / checkpoint_name(state.step)
    tmp = Path(ckpt_dir) / f".tmp-{checkpoint_name(state.step)}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.to_dict()))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return str(final)


def resume_path(config: TrainConfig) -> Path:
    """The checkpoint folder that `config.resume` names ("latest": the newest complete one)."""
    if config.resume == "latest":
        found = complete_checkpoints(config.ckpt_dir)
        if not found:
            raise TrainingError(
                f"--resume latest found no complete checkpoint in {config.ckpt_dir}; "
                "train once with --ckpt-dir first, or drop --resume"
            )
        return found[-1]
    return Path(config.resume)


def check_resumable(state: TrainState, plan: Plan) -> None:
    """Refuse a checkpoint that `plan` cannot load: another ZeRO stage, or ZeRO shards for another world."""
    c = plan.config
    if state.zero != c.zero:
        raise TrainingError(
            f"the checkpoint was written with ZeRO stage {state.zero}, this run uses {c.zero}; "
            f"resume with the same --zero {state.zero}"
        )
    if c.zero is not None and state.procs != plan.procs:
        raise TrainingError(
            f"the ZeRO checkpoint was sharded over {state.procs} process(es), this run has "
            f"{plan.procs}; resume with --procs {state.procs}"
        )


def resume(accelerator, plan: Plan, start: TrainState) -> TrainState:
    """Load the checkpoint that `plan` resumes into the prepared objects; return the state to go on from.

    `start` is this run's state at step 0: the settings and model its own checkpoints record.
    """
    path = resume_path(plan.config)
    saved = read_checkpoint_state(path)
    check_resumable(saved, plan)
    if saved.model not in (None, start.model):
        raise TrainingError(
            f"{path} holds another model ({saved.model['params']:,} parameters) than this task "
            f"({start.model['params']:,}); resume with the task and LoRA settings that wrote it, or drop --resume"
        )
    accelerator.load_state(str(path))
    # Accelerate counts micro-steps to find accumulation boundaries; after an out-of-memory
    # restart the accumulation differs from the checkpoint's, so count from this run's.
    accelerator.step = saved.step * plan.grad_accum
    return dataclasses.replace(start, step=saved.step, history=saved.history, stream_position=saved.stream_position)
