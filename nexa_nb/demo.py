"""``python -m nexa_nb.demo``: one real training end to end, on whatever this machine has.

Two worker processes train a small regression MLP under DeepSpeed ZeRO-3, asking for fp16
as a notebook user would (``%nexa_train --zero 3 --fp16 --procs 2``); on a CPU-only
machine that runs in bf16 and says so. Prints the resolved plan, a few progress lines
and the final loss.
"""

from __future__ import annotations

import sys


def regression_task(n: int = 512, dim: int = 16, seed: int = 0):
    import torch

    from nexa_nb import Task

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.05 * torch.randn(n, 1, generator=g)

    def model():
        return torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))

    def loss_fn(outputs, batch):
        return torch.nn.functional.mse_loss(outputs.float(), batch[-1].float())

    return Task(model, list(zip(x, y)), loss_fn=loss_fn, name="demo-regression")


def main() -> int:
    from nexa_nb import train

    result = train(
        regression_task(),
        zero=3,
        precision="fp16",
        procs=2,
        batch_size=16,
        grad_accum=2,
        max_steps=40,
        lr=2e-2,
        warmup_steps=4,
        scheduler="cosine",
    )
    print(result.plan.describe())
    first, last = result.losses[0], result.final_loss
    print(
        f"final loss {last:.4f} (first step {first:.4f}) on {result.num_processes} processes, {result.distributed_type}"
    )
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
