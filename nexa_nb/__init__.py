"""nexa_nb: train models from a Jupyter notebook over Accelerate and DeepSpeed ZeRO.

Importing this package (or ``%load_ext nexa_nb``) imports neither torch nor DeepSpeed, so
the kernel stays fork-safe; the heavy modules load when a run starts. It also makes torch's
CUDA availability checks fork-safe (below).
"""

from __future__ import annotations

import importlib
import os

# torch.cuda.is_available() and device_count() start the CUDA driver in this process unless this
# is set (then they ask NVML), and a process forked after that cannot use the GPU: every worker is
# forked from the kernel, so a kernel that asked "is there a GPU?" could not train on one.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "Task": "nexa_nb.task",
    "TrainConfig": "nexa_nb.config",
    "ConfigError": "nexa_nb.config",
    "resolve_config": "nexa_nb.config",
    "Plan": "nexa_nb.plan",
    "make_plan": "nexa_nb.plan",
    "train": "nexa_nb.api",
    "last_result": "nexa_nb.api",
    "TrainResult": "nexa_nb.api",
    "TrainingError": "nexa_nb.errors",
    "memory_table": "nexa_nb.memory",
    "attach": "nexa_nb.api",
    "DetachedRun": "nexa_nb.api",
    "stop": "nexa_nb.runs",
    "runs_table": "nexa_nb.overview",
    "compare_svg": "nexa_nb.overview",
}

__all__ = sorted(_EXPORTS) + ["load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nexa_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """``%load_ext nexa_nb``: register the ``%nexa_*`` magics."""
    from nexa_nb.magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:
    pass
