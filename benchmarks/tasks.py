"""The models and data the CPU figures train: an MLP regression, sized by `MlpShape`.

The model is a factory (built inside each worker after seeding, as nexa_nb recommends), and
every function here lives at module level so that an exported script imports it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MlpShape:
    """``inputs -> hidden -> (hidden -> hidden) x depth -> 1``, GELU between layers."""

    inputs: int
    hidden: int
    depth: int

    @property
    def params(self) -> int:
        h = self.hidden
        return (self.inputs + 1) * h + self.depth * (h + 1) * h + h + 1


def mlp(inputs: int, hidden: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(hidden, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden, 1))
    return nn.Sequential(*layers)


def mse(outputs, batch):
    return nn.functional.mse_loss(outputs, batch[-1])


def regression_data(samples: int, inputs: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``y = tanh(x w) + noise``: a fixed, learnable dataset of `samples` rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=g)
    y = torch.tanh(x @ torch.randn(inputs, 1, generator=g) / inputs**0.5) + 0.01 * torch.randn(samples, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def mlp_task(shape: MlpShape, samples: int, forward=None, name: str = "bench-mlp"):
    """The nexa_nb.Task of an MLP regression; ``forward`` is usually a `StepClock`."""
    import nexa_nb

    return nexa_nb.Task(
        functools.partial(mlp, shape.inputs, shape.hidden, shape.depth),
        regression_data(samples, shape.inputs),
        loss_fn=mse,
        forward=forward,
        name=name,
    )
