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
    train_data: a map-style dataset (``__len__`` and ``__getitem__``): a list, a torch
                ``Dataset``, or a Hugging Face ``datasets.Dataset`` (raw rows with a collator,
                or ``with_format("torch")``); or a stream, read in its own order: a torch
                ``IterableDataset`` or a ``datasets.IterableDataset``, which needs ``max_steps``
                (its length is unknown) and must yield the same samples in the same order at
                every ``__iter__`` for a resume to be exact (eval_data stays map-style).
    eval_data:  an optional dataset evaluated every ``eval_every`` steps and at the end.
    collate_fn: turns a list of samples into a batch (default: torch's default_collate);
                transformers' data collators fit as they are. A batch holds tensors (numbers
                and None may sit beside them) in a tensor, a tuple/list, a mapping (dict,
                ``BatchEncoding``) or a dataclass, nested as needed.
    loss_fn:    ``loss_fn(outputs, batch) -> scalar tensor``; not needed when the model's
                output has a ``.loss`` (transformers models given labels) or is a dict with
                a "loss" key.
    predict:    ``predict(outputs, batch) -> {name: tensor}``: per-sample tensors of one eval
                batch (predictions, labels, ids), first dimension the batch. They are gathered
                from every rank, the repeats Accelerate pads the last batches with dropped, and
                joined along the first dimension (pad to one length inside `predict` where
                samples differ in length).
    score:      ``score(outputs) -> dict[str, float]``: task-specific scores (F1, accuracy...)
                from `predict`'s tensors of the whole eval set, every sample exactly once, in
                any number of processes. Given with `predict`.
    metrics:    ``metrics(model, eval_batches) -> dict[str, float]``, an older form: it runs on
                every rank with that rank's shard of the eval batches (the last one padded with
                repeats), and rank 0's scores are reported. Prefer `predict` and `score`.
    forward:    ``forward(model, batch) -> outputs``; default: ``model(**batch)`` for a
                mapping batch, ``model(**fields)`` for a dataclass batch, ``model(*batch[:-1])``
                for a tuple/list batch, named tuples included (the last item being the
                target), ``model(batch)`` otherwise. With a forward of its own, a batch may
                hold anything the forward takes. Before the workers start, the model (a factory
                too), the forward and loss_fn also run once on fake tensors, in a process
                forked for it (`nexa_nb.activations`), to check the first batch and size its
                activations; what they change there stays there.
    name:       used in messages, exported scripts and tracker run names.
    tokenizer:  an optional tokenizer (anything with ``save_pretrained``), written beside the
                trained model so that the output folder loads as one with ``from_pretrained``.
    """

    model: Any
    train_data: Any
    eval_data: Any = None
    collate_fn: Callable | None = None
    loss_fn: Callable | None = None
    metrics: Callable | None = None
    forward: Callable | None = None
    name: str = "task"
    tokenizer: Any = None
    predict: Callable | None = None
    score: Callable | None = None

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
