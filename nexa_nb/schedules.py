"""Learning-rate schedules: ``SCHEDULES[name](step, warmup, total) -> factor`` of the base rate.

Pure functions (no torch) so that the config can list the choices without importing the
engine; the engine wraps the chosen one in a ``LambdaLR``. A new schedule is one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _after_warmup(decay: Callable[[float], float]) -> Callable[[int, int, int], float]:
    """A linear warm-up over `warmup` steps, then ``decay(progress)``, progress going 0 -> 1 until `total`."""

    def factor(step: int, warmup: int, total: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(min(1.0, (step - warmup) / max(1, total - warmup)))

    return factor


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "constant": _after_warmup(lambda progress: 1.0),
    "linear": _after_warmup(lambda progress: 1.0 - progress),
    "cosine": _after_warmup(lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress))),
}
