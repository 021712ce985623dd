"""Evaluation over the whole eval set, every sample exactly once, in any number of processes.

Accelerate gives every rank the same number of eval batches (under ZeRO-3 a forward needs
every rank) by repeating samples from the start of the set in the last batches. Counted as
they come, those repeats weigh a few samples twice and report one rank's share as the whole.
Here:

* the eval loss is the mean over samples: each batch's loss weighs as many samples as the
  rank really owns in it, and the last batch is evaluated once more on those samples alone
  (by every rank, so that ZeRO-3's gathers stay in step);
* `Task.predict` turns each batch's outputs into per-sample tensors (predictions, labels);
  they are gathered from every rank with ``gather_for_metrics``, which drops the repeats, and
  `Task.score` sees the whole set's at once, on every rank.
"""

from __future__ import annotations

import torch

from nexa_nb.engine.batches import cast_floats, extract_loss, map_tensors
from nexa_nb.errors import TrainingError


def take_first(batch, count: int):
    """The first `count` samples of a batch: tensors cut along their first dimension, any container kept."""
    return map_tensors(lambda tensor: tensor[:count] if tensor.dim() else tensor, batch)


def batch_size(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (0 when it holds none)."""
    sizes: list[int] = []

    def note(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.shape[0] if tensor.dim() else 1)
        return tensor

    map_tensors(note, batch)
    return sizes[0] if sizes else 0


def own_samples(accelerator, size: int) -> int:
    """How many samples of this rank's current eval batch are its own, not repeats.

    In the last round of batches only the first ``remainder`` samples of the global batch
    (ranks in order, `size` each) are real; ``remainder`` is -1 for a set without length.
    """
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return size
    return max(0, min(size, state.remainder - accelerator.process_index * size))


def evaluate(rt, task) -> dict[str, float]:
    """Mean eval loss over every eval sample once, and the task's scores (see the module docstring)."""
    accelerator, model = rt.accelerator, rt.model
    model.eval()
    loss_sum, samples = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    gathered: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for batch in rt.eval_loader:
            if rt.cast_dtype is not None:
                batch = cast_floats(batch, rt.cast_dtype)
            size = batch_size(batch)
            own = own_samples(accelerator, size)
            state = accelerator.gradient_state
            last_round = accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0
            outputs = rt.forward(model, batch)
            if task.predict is not None:
                gathered.append(accelerator.gather_for_metrics(dict(task.predict(outputs, batch))))
            if last_round:  # every rank, in step: the loss of its own samples alone (at least one, for shapes)
                part = take_first(batch, max(own, 1))
                outputs, batch = rt.forward(model, part), part
            loss = _loss_or_none(outputs, batch, task)
            if loss is not None:
                loss_sum += loss.float() * own
                samples += own
    metrics: dict[str, float] = {}
    loss_sum, samples = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(samples, "sum")
    if samples.item() > 0:
        metrics["loss"] = (loss_sum / samples).item()
    if task.score is not None:
        whole = {key: torch.cat([part[key] for part in gathered]) for key in gathered[0]} if gathered else {}
        metrics.update({key: float(value) for key, value in task.score(whole).items()})
    if task.metrics is not None:
        # Every rank runs the metric: under ZeRO-3 a forward needs all ranks to gather weights.
        with torch.no_grad():
            metrics.update({k: float(v) for k, v in task.metrics(model, rt.eval_loader).items()})
    model.train()
    return metrics


def _loss_or_none(outputs, batch, task) -> torch.Tensor | None:
    """The batch's loss, or None for a model that gives none in eval (then only the scores count)."""
    try:
        return extract_loss(outputs, batch, task.loss_fn)
    except TrainingError:
        return None
