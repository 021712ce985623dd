"""What the loop does with a batch: call the model, find the loss, cast inputs, count tokens.

A batch is a tensor, a tuple/list (the last item being the target), or any mapping of
names to tensors (a dict, or the ``BatchEncoding`` that transformers' collators return).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nexa_nb.errors import TrainingError


def default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
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
            "or give the model labels so that its output has .loss"
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TrainingError(
            f"the loss must be a scalar tensor, got {type(loss).__name__}"
            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}; "
            "reduce it with .mean() in loss_fn"
        )
    return loss


def cast_floats(batch, dtype):
    """DeepSpeed bf16/fp16 engines do not autocast inputs: cast floating tensors to the model's dtype."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


def count_tokens(batch) -> int | None:
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
    return None
