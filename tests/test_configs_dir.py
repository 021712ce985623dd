"""Every ready-made file in configs/ loads, plans on CPU and GPU hosts, and is documented.

The tests are parametrized over the folder's listing, so a new file is tested as soon as it is added.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nexa_nb.config import resolve_config
from nexa_nb.hardware import Gpu, Hardware
from nexa_nb.plan import make_plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
YAMLS = {p: yaml.safe_load(p.read_text()) or {} for p in FILES if p.suffix != ".json"}
# Plain CPU runs, which `accelerate test` can check on any machine.
CPU_YAMLS = [
    p for p, data in YAMLS.items() if data.get("use_cpu") is True and data.get("distributed_type") != "DEEPSPEED"
]

GIB = 2**30
CPU = Hardware(cpu_cores=2, host_memory_bytes=16 * GIB, host_available_bytes=12 * GIB)
GPU = Hardware(
    gpus=(Gpu("NVIDIA A100-SXM4-80GB", 80 * GIB, 8.0),) * 2,
    cpu_cores=16,
    host_memory_bytes=256 * GIB,
    host_available_bytes=200 * GIB,
    bf16_gpu=True,
)


def ids(paths):
    return [p.name for p in paths]


def values(tree):
    """Every leaf value of a nested dict."""
    for value in tree.values():
        if isinstance(value, dict):
            yield from values(value)
        else:
            yield value


def test_folder_has_cpu_gpu_and_deepspeed_files():
    assert CPU_YAMLS
    assert any(p.suffix == ".json" for p in FILES)
    assert any(data.get("distributed_type") == "DEEPSPEED" for data in YAMLS.values())


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_file_is_documented(path):
    assert f"`{path.name}`" in (CONFIGS / "README.md").read_text()
    if path in YAMLS:
        assert path.read_text().startswith("# "), "start with a comment saying when to use the file"


@pytest.mark.parametrize("path", list(YAMLS), ids=ids(YAMLS))
def test_yaml_is_an_accelerate_config(path):
    """Accelerate itself loads the file: the same keys that `accelerate config` writes."""
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(yaml_file=str(path))


@pytest.mark.parametrize("hardware", [CPU, GPU], ids=["cpu-host", "gpu-host"])
@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_file_plans(path, hardware):
    cfg = resolve_config(config_file=path, environ={})
    plan = make_plan(cfg, hardware, total_params=10_000_000)
    assert plan.effective_batch == plan.micro_batch * plan.grad_accum * plan.procs
    assert plan.procs == cfg.procs
    assert plan.device == ("cuda" if hardware is GPU and not cfg.force_cpu else "cpu")
    assert plan.uses_deepspeed == (cfg.zero is not None)
    if plan.uses_deepspeed:
        ds = plan.deepspeed_config
        assert "auto" not in values(ds)
        assert ds["train_batch_size"] == plan.effective_batch
        assert ds["train_batch_size"] == (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * plan.procs
        )
        assert ds["zero_optimization"]["stage"] == cfg.zero


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU_YAMLS, ids=ids(CPU_YAMLS))
def test_cpu_yaml_passes_accelerate_test(path, tmp_path):
    bin_dir = Path(sys.executable).parent  # `accelerate test` runs `accelerate-launch` from PATH
    # accelerate's test script builds a plain Accelerator(): CPU workers join one process group
    # only when told to use the CPU, as cpu_multi.yaml's header says.
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", ACCELERATE_USE_CPU="1")
    # accelerate's test script writes scratch files into the working directory: a private one
    result = subprocess.run(
        [str(bin_dir / "accelerate"), "test", "--config_file", str(path.absolute())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Test is a success" in result.stdout
    procs = YAMLS[path].get("num_processes", 1)
    assert result.stdout.count(f"Num processes: {procs}") == procs  # one process group, not copies
