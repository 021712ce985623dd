"""`Task`: what to train (model, data, loss, metrics), independent of how it is run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Task:
    """A model and its data.

    model:      an ``nn.Module`` or a zero-argument factory returning one. A factory is
                preferred: it is called inside every worker, after the seed is set, so
                the initial weights are identical on every rank and (under ZeRO-3) a large
                model is never built whole in the notebook kernel.
    train_data: a map-style dataset (``__len__`` and ``__getitem__``).
    eval_data:  an optional dataset evaluated every ``eval_every`` steps and at the end.
    collate_fn: turns a list of samples into a batch (default: torch's default_collate).
    loss_fn:    ``loss_fn(outputs, batch) -> scalar tensor``; not needed when the model's
                output has a ``.loss`` (transformers models given labels) or is a dict with
                a "loss" key.
    metrics:    ``metrics(model, eval_batches) -> dict[str, float]``, for task-specific scores
                (F1, mAP, accuracy...). It runs on every rank at each evaluation (under
                ZeRO-3 a forward needs all ranks), with that rank's shard of the eval batches,
                and rank 0's scores are reported. For a score of the whole eval set with
                several processes, gather across ranks (``torch.distributed.all_gather_object``)
                or score held-out data the metric keeps itself, as the tutorials do.
    forward:    ``forward(model, batch) -> outputs``; default: ``model(**batch)`` for a
                dict batch, ``model(*batch[:-1])`` for a tuple/list batch (the last item being
                the target), ``model(batch)`` otherwise.
    name:       used in messages, exported scripts and tracker run names.
    """

    model: Any
    train_data: Any
    eval_data: Any = None
    collate_fn: Callable | None = None
    loss_fn: Callable | None = None
    metrics: Callable | None = None
    forward: Callable | None = None
    name: str = "task"

    def build_model(self):
        """The model itself: calls the factory when `model` is one."""
        import torch.nn as nn

        if isinstance(self.model, nn.Module):
            return self.model
        model = self.model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def model_is_factory(self) -> bool:
        return callable(self.model) and not _is_module(self.model)


def _is_module(obj: Any) -> bool:
    try:
        import torch.nn as nn
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return isinstance(obj, nn.Module)
