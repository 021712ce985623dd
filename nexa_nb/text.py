"""Plain-text formatting shared by the magics, the plan, the memory estimates and the sinks.

Pure functions of plain values: this module imports nothing else of nexa_nb (and not torch),
so any module can use it without an import cycle, and one setup reads the same everywhere.
"""

from __future__ import annotations

GIB = 2**30
BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
PRECISION_LABELS = {"no": "fp32"}  # "fp16" and "bf16" read as they are
DISTRIBUTED_LABELS = {"NO": "single process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP"}  # others ("FSDP") as they are


def byte_unit(n: float) -> tuple[str, int]:
    """The largest binary unit not above `n`, and its size: ("GiB", 2**30), ..., ("B", 1)."""
    return next(((unit, size) for unit, size in BYTE_UNITS if n >= size), ("B", 1))


def format_bytes(n: int) -> str:
    """``1.50 GiB`` style: the largest binary unit that keeps the number at least 1 ("512 B" below 1 KiB)."""
    unit, size = byte_unit(n)
    return f"{n} B" if size == 1 else f"{n / size:.2f} {unit}"


def precision_label(precision: str) -> str:
    """A mixed-precision setting as people say it: "no" -> "fp32"; "fp16" and "bf16" unchanged."""
    return PRECISION_LABELS.get(precision, precision)


def strategy_label(zero: int | None, distributed_type: str) -> str:
    """The strategy in two words: "ZeRO-3", "FSDP", "DDP", "single process".

    `distributed_type` is what Accelerate reports ("NO", "MULTI_GPU", ...); it decides only
    when ZeRO is off.
    """
    if zero is not None:
        return f"ZeRO-{zero}"
    return DISTRIBUTED_LABELS.get(distributed_type, distributed_type)


def strategy_description(
    zero: int | None, distributed_type: str, offload_optimizer: str = "none", offload_param: str = "none"
) -> str:
    """The strategy with its backend and offloads: "DeepSpeed ZeRO-3 (offload optimizer->cpu, params->cpu)"."""
    text = strategy_label(zero, distributed_type)
    if zero is not None:
        text = f"DeepSpeed {text}"
    offload = [
        f"{what}->{device}"
        for what, device in (("optimizer", offload_optimizer), ("params", offload_param))
        if device != "none"
    ]
    return f"{text} (offload {', '.join(offload)})" if offload else text


def setup_flags(stage: int | None, offload_optimizer: str = "none", offload_param: str = "none") -> str:
    """The %nexa_train flags of a ZeRO setup, e.g. "--zero 3 --offload cpu --offload-param cpu"
    ("" for plain Accelerate, without ZeRO)."""
    if stage is None:
        return ""
    flags = f"--zero {stage}"
    if offload_optimizer != "none":
        flags += f" --offload {offload_optimizer}"
    if offload_param != "none":
        flags += f" --offload-param {offload_param}"
    return flags


def table(rows, header) -> str:
    """Rows of cells as left-aligned plain-text columns two spaces apart, `header` first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)
    )


def one_line(exc: BaseException) -> str:
    """An error's message on one line, as a magic shows it."""
    return " ".join(str(exc).split())
