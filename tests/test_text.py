"""The shared formatting: bytes, labels, flags and plain-text tables."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nexa_nb.text import (
    byte_unit,
    format_bytes,
    precision_label,
    setup_flags,
    strategy_description,
    strategy_label,
    table,
)

GIB = 2**30


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(3 * GIB // 2) == "1.50 GiB"
    assert format_bytes(5 * 2**20) == "5.00 MiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"
    assert format_bytes(2**50) == "1024.00 TiB"


def test_byte_unit_is_the_largest_unit_not_above_the_number():
    assert byte_unit(80 * GIB) == ("GiB", GIB)
    assert byte_unit(GIB - 1) == ("MiB", 2**20)
    assert byte_unit(0) == ("B", 1)


@pytest.mark.parametrize("precision, label", [("no", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")])
def test_precision_label(precision, label):
    assert precision_label(precision) == label


@pytest.mark.parametrize(
    "zero, distributed_type, label",
    [
        (3, "DEEPSPEED", "ZeRO-3"),
        (0, "DEEPSPEED", "ZeRO-0"),
        (None, "FSDP", "FSDP"),
        (None, "MULTI_GPU", "DDP"),
        (None, "MULTI_CPU", "DDP"),
        (None, "NO", "single process"),
    ],
)
def test_strategy_label(zero, distributed_type, label):
    assert strategy_label(zero, distributed_type) == label


def test_strategy_description_names_deepspeed_and_the_offloads():
    assert (
        strategy_description(3, "DEEPSPEED", "cpu", "nvme") == "DeepSpeed ZeRO-3 (offload optimizer->cpu, params->nvme)"
    )
    assert strategy_description(2, "DEEPSPEED", "cpu") == "DeepSpeed ZeRO-2 (offload optimizer->cpu)"
    assert strategy_description(1, "DEEPSPEED") == "DeepSpeed ZeRO-1"
    assert strategy_description(None, "MULTI_GPU") == "DDP"


def test_setup_flags():
    assert setup_flags(None) == ""
    assert setup_flags(2) == "--zero 2"
    assert setup_flags(3, "cpu", "cpu") == "--zero 3 --offload cpu --offload-param cpu"
    assert setup_flags(3, "none", "nvme") == "--zero 3 --offload-param nvme"


def test_table_pads_columns_and_strips_line_ends():
    assert table([("--zero 3", "1.00 GiB"), ("", "12.00 GiB")], ("setup", "per device")).splitlines() == [
        "setup     per device",
        "--zero 3  1.00 GiB",
        "          12.00 GiB",
    ]


def test_imports_nothing_of_nexa_nb_nor_torch():
    code = "import sys, nexa_nb.text; print(sorted(m for m in sys.modules if m.startswith(('nexa_nb.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['nexa_nb.text']"]
