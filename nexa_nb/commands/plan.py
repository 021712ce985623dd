"""``%nexa_plan``: memory per setup (model states, and activations traced from a task), and the setup to train with."""

from __future__ import annotations

import argparse
from dataclasses import replace

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


def run(session: Session, args, *, model=None, task=None, counted: str = "given") -> None:
    """Print the memory table for `args.params`, `model`'s count or `task`'s model and first batch.

    With a task, its model is built on fake tensors and its first step traced (`nexa_nb.activations`):
    the table then shows each setup's largest micro-batch and its activations, and the
    recommendation its micro-batch, accumulation and gradient checkpointing.
    """
    with core_errors():
        cfg = session.resolve()
    first = _first_step(task, cfg) if task is not None else None
    if args.params is not None:
        total, largest = args.params, args.largest_layer or args.params
    elif first is not None and first.total_params:
        total, largest = first.total_params, first.largest_layer_params
    else:
        total, largest = memory.count_params(model if model is not None else task.build_model())
    hw = probe()
    devices = args.gpus if args.gpus is not None else len(hw.gpus) or cfg.procs
    device_bytes, where, base = _device(args, hw, devices)
    activations = first.activations if first is not None else ()
    wanted = cfg.batch_size * (cfg.target_batch // (cfg.batch_size * devices) if cfg.target_batch else cfg.grad_accum)
    # with a task, the precision it will train in (fp32 doubles DeepSpeed's 16-bit terms); without, DeepSpeed's
    weight_bytes = 4 if first is not None and cfg.precision == "no" else 2
    with core_errors(ValueError):
        rows = memory.memory_table(total, largest, gpus_per_node=devices, weight_bytes=weight_bytes)
        nvme = memory.nvme_rows(total, largest, gpus_per_node=devices, weight_bytes=weight_bytes)
        disk = [None] * len(rows) + [on_disk for _, on_disk in nvme]
        rows = rows + [row for row, _ in nvme]
        best = memory.recommend(
            total,
            largest,
            device_bytes_available=device_bytes,
            host_bytes_available=hw.host_available_bytes,
            gpus_per_node=devices,
            activations=activations,
            wanted_micro_batch=wanted,
            max_memory_usage=cfg.max_memory_usage,
            memory_safety_margin=cfg.memory_safety_margin,
            framework_base_bytes=base,
            weight_bytes=weight_bytes,
        )
    print(f"model: {total:,} parameters, largest layer {largest:,} ({counted})")
    print(f"devices: {devices} ({where}); host: {text.format_bytes(hw.host_available_bytes)} available")
    if first is not None:
        print(_activations_line(first, cfg.batch_size))
    if activations:
        budget = memory.usable_bytes(device_bytes, cfg.max_memory_usage, cfg.memory_safety_margin)
        print(_fits_table(memory.fits_table(rows, budget, wanted, activations, base, total), disk))
    else:
        print(_states_table(rows, disk))
    print(f"recommended: {_recommended_flags(best)}")
    print(f"reason: {best.reason}")
    for note in first.notes if first is not None else ():
        print(f"note: {note}")


def _first_step(task, cfg):
    """The task's first step traced on fake tensors, after the checks a run makes (`api.preflight`)."""
    from nexa_nb import api
    from nexa_nb.plan import make_plan, resolve_output_dir

    with core_errors():
        return api.preflight(task, replace(make_plan(cfg), output_dir=resolve_output_dir(cfg, task.name)))


def _device(args, hw, devices: int) -> tuple[int, str, int]:
    """Bytes of one device, its description, and what the framework holds on it."""
    if args.gpu_mem is not None:
        device_bytes = int(args.gpu_mem * GiB)
        return device_bytes, f"{text.format_bytes(device_bytes)} each", memory.CUDA_CONTEXT_BYTES
    if hw.gpus:
        return (
            hw.device_memory_bytes,
            f"{hw.gpus[0].name}, {text.format_bytes(hw.device_memory_bytes)} each",
            memory.CUDA_CONTEXT_BYTES,
        )
    where = (
        f"no GPU: host memory is the device memory, {text.format_bytes(hw.host_available_bytes)} "
        f"available shared by {devices} process(es)"
    )
    return hw.host_available_bytes // devices, where, memory.CPU_WORKER_BYTES


def _activations_line(first, micro_batch: int) -> str:
    if not first.activations:
        return "activations: not estimated"
    parts = [
        f"{text.format_bytes(a.per_sample_bytes)} per sample + {text.format_bytes(a.fixed_bytes)}"
        f"{' with gradient checkpointing' if a.grad_ckpt else ''}"
        for a in first.activations
    ]
    how = "traced on fake tensors" if all(a.method == "traced" for a in first.activations) else "measured"
    return f"activations: {'; '.join(parts)} ({how} from the first batch of {micro_batch})"


def _states_table(rows, disk) -> str:
    return text.table(
        [
            (
                setup_label(r) or "plain Accelerate",
                text.format_bytes(r.device_bytes),
                text.format_bytes(r.host_bytes),
                _disk(on_disk),
            )
            for r, on_disk in zip(rows, disk)
        ],
        ("setup", "per device", "host", "NVMe disk"),
    )


def _disk(on_disk: int | None) -> str:
    return "" if on_disk is None else text.format_bytes(on_disk)


def _fits_table(fits, disk) -> str:
    def micro(f) -> str:
        if f.micro_batch is None:
            return "does not fit"
        return f"{f.micro_batch}{' (checkpointed)' if f.grad_ckpt else ''}"

    return text.table(
        [
            (
                setup_label(f.row) or "plain Accelerate",
                text.format_bytes(f.row.device_bytes),
                micro(f),
                text.format_bytes(f.activation_bytes),
                text.format_bytes(f.device_bytes),
                text.format_bytes(f.row.host_bytes),
                _disk(on_disk),
            )
            for f, on_disk in zip(fits, disk)
        ],
        ("setup", "model states", "micro-batch", "activations", "per device", "host", "NVMe disk"),
    )


def _recommended_flags(best) -> str:
    flags = setup_label(best) or "plain Accelerate (no --zero)"
    if best.grad_ckpt is None or best.micro_batch is None:
        return flags
    batch = f"--batch-size {best.micro_batch} --grad-accum {best.grad_accum}"
    return f"{flags} {batch}{' --grad-ckpt' if best.grad_ckpt else ''}"
