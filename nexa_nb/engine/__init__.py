"""The one training loop, run inside every worker process (or the kernel, for one process).

Every entry point ends here: the magics and `nexa_nb.train` through the launcher, and
exported scripts under ``accelerate launch``.  It knows nothing about notebooks; it reports
through ``emit``.  One module per job:

* `runtime`: setup, from (plan, task) to the prepared Accelerator, model, optimizer, loaders;
* `state` and `checkpoints`: what a checkpoint stores, atomic saves, an exact resume;
* `batches`: calling the model on a batch, finding the loss, casting inputs;
* `reporter`: events for the sinks, the history, the trackers;
* `loop`: `run` (setup, resume, fit, finish) and `fit`, the loop itself;
* `evaluation`: the eval loss and the task's scores over every eval sample exactly once;
* `final_model`: the trained model written to its folder by the workers, and read back;
* `outcome`: what a run hands back, and its last event.

Names are loaded on first use, so that ``nexa_nb.engine.checkpoints`` and
``nexa_nb.engine.outcome`` stay importable without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run": "nexa_nb.engine.loop",
    "Outcome": "nexa_nb.engine.outcome",
    "end_stream": "nexa_nb.engine.outcome",
    "TrainState": "nexa_nb.engine.state",
    "STATE_FILE": "nexa_nb.engine.checkpoints",
    "checkpoint_name": "nexa_nb.engine.checkpoints",
    "complete_checkpoints": "nexa_nb.engine.checkpoints",
    "read_checkpoint_state": "nexa_nb.engine.checkpoints",
    "resume_path": "nexa_nb.engine.checkpoints",
    "check_resumable": "nexa_nb.engine.checkpoints",
    "default_forward": "nexa_nb.engine.batches",
    "extract_loss": "nexa_nb.engine.batches",
    "steps_per_epoch": "nexa_nb.engine.runtime",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nexa_nb.engine' has no attribute {name!r}")
