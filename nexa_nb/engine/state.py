"""`TrainState`: what a checkpoint stores beside the weights, and what a resume needs back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nexa_nb.plan import Plan


@dataclass
class TrainState:
    """The run's position and the settings a checkpoint may only be resumed with.

    `procs`, `zero`, `micro_batch` and `grad_accum` are those of the run that wrote it;
    `model` is its model's fingerprint (parameter count and a digest of names and shapes).
    `stream_position` is where a streamed train_data stands: (pass, samples read in that pass)
    after the step's last micro-batch; None for map-style data, whose position follows from `step`.
    """

    step: int
    procs: int | None
    zero: int | None
    micro_batch: int | None
    grad_accum: int | None
    history: list[dict[str, Any]]
    task: str | None
    model: dict[str, Any] | None
    stream_position: tuple[int, int] | None = None

    @classmethod
    def start(cls, plan: Plan, task_name: str, fingerprint: dict[str, Any]) -> TrainState:
        """Step 0 of a run under `plan`."""
        return cls(
            step=0,
            procs=plan.procs,
            zero=plan.config.zero,
            micro_batch=plan.micro_batch,
            grad_accum=plan.grad_accum,
            history=[],
            task=task_name,
            model=fingerprint,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            step=data["step"],
            procs=data.get("procs"),
            zero=data.get("zero"),
            micro_batch=data.get("micro_batch"),
            grad_accum=data.get("grad_accum"),
            history=data.get("history", []),
            task=data.get("task"),
            model=data.get("model"),
            stream_position=tuple(data["stream_position"]) if data.get("stream_position") else None,
        )
