"""``%nexa_plan``: model-state memory per setup, and the setup to train with."""

from __future__ import annotations

import argparse

from nexa_nb import memory, text
from nexa_nb.commands.errors import core_errors
from nexa_nb.hardware import probe
from nexa_nb.session import Session

GiB = 2**30


def positive(kind):
    """An argparse type: a number of `kind` above 0."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}, expected a number above 0")
        return value

    return convert


def parse_count(text: str) -> int:
    """``7e9``, ``7B``, ``350M``, ``125_000`` -> a parameter count of at least 1."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(text[-1:].upper(), 1)
    try:
        count = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}, write a positive count such as 350M, 7B or 7e9")
    return count


def setup_label(setup) -> str:
    return text.setup_flags(setup.stage, setup.offload_optimizer, setup.offload_param)


def run(session: Session, args, *, model=None, counted: str = "given") -> None:
    """Print the memory table for `args.params` (or `model`'s count) on the devices asked for."""
    if args.params is not None:
        total, largest = args.params, args.largest_layer or args.params
    else:
        total, largest = memory.count_params(model)
    with core_errors():
        cfg = session.resolve()
    hw = probe()
    devices = args.gpus if args.gpus is not None else len(hw.gpus) or cfg.procs
    if args.gpu_mem is not None:
        device_bytes = int(args.gpu_mem * GiB)
        where = f"{text.format_bytes(device_bytes)} each"
    elif hw.gpus:
        device_bytes = hw.device_memory_bytes
        where = f"{hw.gpus[0].name}, {text.format_bytes(device_bytes)} each"
    else:
        device_bytes = hw.host_available_bytes // devices
        where = (
            f"no GPU: host memory is the device memory, {text.format_bytes(hw.host_available_bytes)} "
            f"available shared by {devices} process(es)"
        )
    with core_errors(ValueError):
        rows = memory.memory_table(total, largest, gpus_per_node=devices)
        best = memory.recommend(
            total,
            largest,
            device_bytes_available=device_bytes,
            host_bytes_available=hw.host_available_bytes,
            gpus_per_node=devices,
            wanted_micro_batch=cfg.batch_size,
        )
    print(f"model: {total:,} parameters, largest layer {largest:,} ({counted})")
    print(f"devices: {devices} ({where}); host: {text.format_bytes(hw.host_available_bytes)} available")
    print(
        text.table(
            [
                (
                    setup_label(r) or "plain Accelerate",
                    text.format_bytes(r.device_bytes),
                    text.format_bytes(r.host_bytes),
                )
                for r in rows
            ],
            ("setup", "per device", "host"),
        )
    )
    print(f"recommended: {setup_label(best) or 'plain Accelerate (no --zero)'}")
    print(f"reason: {best.reason}")
