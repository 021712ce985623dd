"""What the loop does with a batch: call the model, find the loss, cast and place inputs, count tokens.

A batch is a tensor; a tuple or list (a named tuple too), the last item being the target;
a mapping of names to tensors (a dict, or the ``BatchEncoding`` that transformers' collators
return); or a dataclass, whose fields are names like a mapping's keys. Containers nest, and
plain numbers or None may sit beside the tensors (flash-attention lengths, flags).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nexa_nb.errors import TrainingError


def default_forward(model, batch):
    """``model(**batch)`` for named inputs (a mapping, or a dataclass's fields), ``model(*batch[:-1])``
    for a tuple or list (a named tuple too: its order is its meaning, as in ``(inputs, target)``),
    ``model(batch)`` for a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if _is_dataclass(batch):
        return model(**_fields(batch))
    if isinstance(batch, (list, tuple)):
        return model(*batch[:-1])
    return model(batch)


def extract_loss(outputs, batch, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    elif isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        loss = outputs
    elif isinstance(outputs, dict) and outputs.get("loss") is not None:
        loss = outputs["loss"]
    elif getattr(outputs, "loss", None) is not None:
        loss = outputs.loss
    else:
        raise TrainingError(
            f"the model returned {type(outputs).__name__} with no loss; pass Task(loss_fn=...) "
            f"or give the model labels so that its output has .loss{_labels_hint(batch)}"
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TrainingError(
            f"the loss must be a scalar tensor, got {type(loss).__name__}"
            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}; "
            "reduce it with .mean() in loss_fn"
        )
    return loss


def _labels_hint(batch) -> str:
    """Where the labels of a batch went astray, for the two ways the default forward loses them."""
    if _is_namedtuple(batch):
        return (
            f" (a named tuple batch is called as model(*batch[:-1]), without its last field {batch._fields[-1]!r}; "
            "to pass every field by name: Task(forward=lambda model, batch: model(**batch._asdict())))"
        )
    if isinstance(batch, Mapping) and "label" in batch and "labels" not in batch:
        return (
            " (the batch has 'label', transformers models take 'labels': dataset.rename_column('label', 'labels'), "
            "or Task(collate_fn=transformers.default_data_collator), which renames it)"
        )
    return ""


def cast_floats(batch, dtype):
    """DeepSpeed bf16/fp16 engines do not autocast inputs: cast floating tensors to the model's dtype."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)


def placing_collate(collate: Callable, device) -> Callable:
    """`collate`, then a dataclass batch moved to `device`.

    Accelerate's prepared loaders move tensors, tuples and mappings to the device but pass
    any other object through untouched: a dataclass batch would reach a GPU model on the CPU.
    """
    return functools.partial(_collate_and_place, collate, device)


def _collate_and_place(collate: Callable, device, samples):
    batch = collate(samples)
    if _is_dataclass(batch) and not isinstance(batch, Mapping):
        return map_tensors(lambda t: t.to(device, non_blocking=True), batch)  # never waits for the device
    return batch


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch):
    """`batch` with `fn` applied to every tensor in it, each container rebuilt as the same type."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: map_tensors(fn, v) for k, v in batch.items()})
    if _is_dataclass(batch):  # fields with init=False are left to the class's __post_init__, as replace() does
        changes = {f.name: map_tensors(fn, getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def _rebuild_mapping(batch: Mapping, items: dict) -> Mapping:
    """The same mapping type when it builds from a dict (dict, BatchEncoding, UserDict), else a dict."""
    try:
        return type(batch)(items)
    except TypeError:  # defaultdict, or a Mapping class with other constructor arguments
        return items


def count_tokens(batch) -> torch.Tensor | int | None:
    """The tokens of a named batch: its attention mask's sum, else its input ids' count; None without either.

    The sum stays a tensor on the batch's device: reading it here would make the host wait for
    the device at every micro-batch.
    """
    named = _named(batch)
    if named is None:
        return None
    for key, count in (("attention_mask", lambda t: t.sum()), ("input_ids", lambda t: t.numel())):
        if isinstance(named.get(key), torch.Tensor):
            return count(named[key])
    return None


def batch_problem(batch) -> str | None:
    """Why the default forward cannot hand `batch` to a model, or None when it can.

    Every leaf must be a tensor, a number or None, and at least one a tensor: anything else
    (a text column the collate step kept, a list of samples it did not combine) would reach
    the model as it is.
    """
    tensors: list[str] = []
    problem = _first_problem(batch, "batch", tensors)
    if problem is None and not tensors:
        problem = f"batch is {_describe(batch)} holding no tensor"
    return problem


def _first_problem(x, where: str, tensors: list[str]) -> str | None:
    """The first part of `x` that is not a tensor, number or None, or a container of them; tensors found go
    into `tensors`."""
    if isinstance(x, torch.Tensor):
        tensors.append(where)
        return None
    if _is_leaf(x):
        return None
    named = _named(x)
    if named is not None:
        parts = [(f"{where}[{k!r}]" if isinstance(x, Mapping) else f"{where}.{k}", v) for k, v in named.items()]
    elif isinstance(x, (list, tuple)) and all(
        _is_leaf(v) or _named(v) is not None or isinstance(v, (list, tuple)) for v in x
    ):
        parts = [(f"{where}[{i}]", v) for i, v in enumerate(x)]
    else:  # a list of strings is named as the list, where the column it came from shows
        return f"{where} is {_describe(x)}"
    for path, value in parts:
        problem = _first_problem(value, path, tensors)
        if problem:
            return problem
    return None


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, (torch.Tensor, bool, int, float))


def _describe(x) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {type(x[0]).__name__}" if x else f"an empty {type(x).__name__}"
    return f"a {type(x).__name__}"


def _named(batch) -> Mapping | None:
    """A mapping, a dataclass's fields or a named tuple's items, by name; None for other batches."""
    if isinstance(batch, Mapping):
        return batch
    if _is_dataclass(batch):
        return _fields(batch)
    if _is_namedtuple(batch):
        return batch._asdict()
    return None


def _fields(batch) -> dict[str, Any]:
    """A dataclass's fields, not copied (``dataclasses.asdict`` would deep-copy every tensor)."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def _is_dataclass(x) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")
