"""What a run hands back, and the last event of its stream. No torch here: the kernel builds
both when workers were interrupted or failed before rank 0 could."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nexa_nb import events as ev


@dataclass
class Outcome:
    """What rank 0 hands back to the caller when the loop ends."""

    status: str
    history: list[dict[str, Any]]
    final_loss: float | None
    eval_metrics: dict[str, float]
    checkpoint_dir: str | None
    distributed_type: str
    num_processes: int
    model_dir: str | None = None
    """The folder rank 0 wrote the trained model into (`engine.final_model`); None unless completed."""
    message: str = ""
    notes: list[str] = field(default_factory=list)


def end_stream(
    emit: Callable[[ev.Event], None],
    status: str,
    step: int,
    *,
    final_loss: float | None = None,
    message: str = "",
    checkpoint_dir: str | None = None,
) -> None:
    """Send a run's last event: from rank 0 when its loop returns, or from the kernel for a run
    whose workers were interrupted or failed first."""
    emit(ev.RunEnded(status=status, step=step, final_loss=final_loss, message=message, checkpoint_dir=checkpoint_dir))
