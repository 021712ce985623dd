"""Known mistakes in a task's first step, told apart by their error and the batch, each with its fix.

The first training step fails the same way for many new users: a forward whose arguments
are not the batch's keys, float or int32 labels for a classification loss, and rows of
Python ints padded by hand (which ``default_collate`` turns into one tensor per position).
`explain` turns such a failure into one line that names the fix; anything else gets the
error's own first line and the general fix.  Nothing here imports torch.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

LABEL_NAMES = ("labels", "label", "target", "targets", "y")


def known_mistake(exc: BaseException, task, batch, model=None) -> str | None:
    """One line naming the fix, when the failure `exc` of the first step on `batch` is a known mistake."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    for explain_one in (_unexpected_argument, _listed_rows, _label_dtype, _float_labels_for_classes):
        line = explain_one(text, task, batch, model)
        if line:
            return line
    return None


def explain(exc: BaseException, task, batch, model=None) -> str:
    """One line for the failure `exc` of the first step on `batch`: a known mistake's fix, or the
    error's first line and the general fix."""
    known = known_mistake(exc, task, batch, model)
    if known:
        return known
    text = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"the model's forward failed on the first batch ({type(exc).__name__}: {text}); check that the "
        "dataset's samples match the model's inputs (and the labels the loss), or pass Task(forward=...)"
    )


def _unexpected_argument(text: str, task, batch, model) -> str | None:
    found = re.search(r"got an unexpected keyword argument '(\w+)'", text)
    if not found or task.forward is not None or not isinstance(batch, Mapping):
        return None
    name = found.group(1)
    takes = _argument_names(model)
    inputs = [k for k in batch if k not in LABEL_NAMES] or list(batch)
    call = ", ".join(f"batch[{k!r}]" for k in inputs[: max(1, len(takes))])
    return (
        f"the model's forward takes no argument {name!r}: it takes ({', '.join(takes)}), and the default forward "
        f"calls model(**batch) with the batch's keys ({', '.join(map(str, batch))}); pass "
        f"Task(forward=lambda model, batch: model({call})) (with a loss_fn that reads the labels from the batch), "
        "or rename the dataset's columns to the forward's argument names"
    )


def _argument_names(model) -> list[str]:
    if model is None:
        return []
    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    except (TypeError, ValueError):
        return []


def _listed_rows(text: str, task, batch, model) -> str | None:
    """Rows given as Python lists: ``default_collate`` makes a list of per-position tensors of them."""
    if task.collate_fn is not None or "list" not in text:
        return None
    for name, value in _named_leaves(batch):
        if isinstance(value, list) and value and all(_is_tensor(v) for v in value):
            return (
                f"batch[{name!r}] is a list of {len(value)} tensors, not one tensor: the samples' {name!r} are Python "
                "lists, which default_collate turns into one tensor per position; return "
                f"torch.tensor(...) for {name!r} from the dataset (rows padded to one length), use "
                "dataset.with_format('torch'), or pass Task(collate_fn=transformers.DataCollatorWithPadding(tokenizer))"
            )
    return None


def _label_dtype(text: str, task, batch, model) -> str | None:
    found = re.search(r"expected target dtype to be Long.*, but got (\w+)", text)
    if not found:
        return None
    where = _labels_field(batch)
    return (
        f"the classification loss takes class indices as torch.long (int64), but {where} holds {found.group(1)}; "
        "return the labels as Python ints (torch.tensor(label) is int64) or cast them in the loss: "
        f"F.cross_entropy(outputs, {where}.long())"
    )


def _float_labels_for_classes(text: str, task, batch, model) -> str | None:
    """transformers reads float labels as multi-label targets (one 0/1 per class)."""
    if not re.search(r"Target size .* must be the same as input size", text):
        return None
    where = _labels_field(batch)
    return (
        f"{where} holds floats, which transformers takes as multi-label targets (one 0/1 per class); for one class "
        "per sample return the labels as Python ints (torch.long), e.g. dataset.cast_column or int(label)"
    )


def _labels_field(batch) -> str:
    if isinstance(batch, Mapping):
        for name in LABEL_NAMES:
            if name in batch:
                return f"batch[{name!r}]"
    if isinstance(batch, (list, tuple)) and batch:
        return "batch[-1]"
    return "the labels"


def _named_leaves(batch) -> list[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        return list(batch.items())
    if isinstance(batch, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(batch)]
    return []


def _is_tensor(value) -> bool:
    return hasattr(value, "untyped_storage")
