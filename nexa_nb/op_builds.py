"""DeepSpeed compiles some of its C++ ops the first time a machine needs them.

The first DeepSpeed run on a CPU machine compiles the shared-memory communication op, and the
first run that offloads the optimizer compiles DeepSpeed's CPU Adam: about half a minute each
on two cores, measured, while the cell shows nothing. Later runs load the built op from torch's
extensions folder. This module says beforehand which ops a plan will compile, so that the live
view can tell the user what they are waiting for. It imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from nexa_nb.plan import Plan
from nexa_nb.settings import ConfigError

# Op name (as DeepSpeed and torch's extension folder spell it) -> what it is, for the note.
COMPILED_OPS = {
    "deepspeed_shm_comm": "its CPU communication op",
    "cpu_adam": "its CPU Adam optimizer",
    "async_io": "its asynchronous I/O op (NVMe offload)",
}


def ops_a_plan_loads(plan: Plan) -> list[str]:
    """The DeepSpeed ops that the workers of `plan` load, built or not."""
    if not plan.uses_deepspeed:
        return []
    ops = []
    if plan.device == "cpu":
        ops.append("deepspeed_shm_comm")
    if plan.config.offload_optimizer in ("cpu", "nvme"):
        ops.append("cpu_adam")
    if "nvme" in (plan.config.offload_optimizer, plan.config.offload_param):
        ops.append("async_io")
    return ops


def ops_to_compile(plan: Plan) -> list[str]:
    """The ops of `plan` that neither DeepSpeed's install nor an earlier run has built."""
    folder = extensions_folder()
    if folder is None:  # unknown: say nothing rather than something wrong
        return []
    prebuilt = _prebuilt_ops()
    return [op for op in ops_a_plan_loads(plan) if not prebuilt.get(op) and not (folder / op / f"{op}.so").exists()]


def compile_note(plan: Plan) -> str | None:
    """One line for the live view when the workers will compile ops before the first step."""
    ops = ops_to_compile(plan)
    if not ops:
        return None
    what = " and ".join(COMPILED_OPS[op] for op in ops)
    return (
        f"DeepSpeed compiles {what} before the first step, once per machine "
        f"(about {30 * len(ops)} s on two cores); later runs start without it."
    )


# DeepSpeed's own test, run where the workers run it: before loading the async I/O op (built or
# not) DeepSpeed compiles and links a small program against libaio, and fails without it.
ASYNC_IO_PROBE = (
    "from deepspeed.ops.op_builder.async_io import AsyncIOBuilder\n"
    "raise SystemExit(0 if AsyncIOBuilder().is_compatible(verbose=False) else 1)"
)


def check_nvme_offload(plan: Plan, environ: dict[str, str] | None = None) -> None:
    """Refuse NVMe offload before any worker starts when DeepSpeed cannot load its async I/O op.

    The probe runs in a subprocess (the kernel never imports DeepSpeed) with `environ`, the
    workers' environment by default.
    """
    if "async_io" not in ops_a_plan_loads(plan):
        return
    which = "offload_optimizer" if plan.config.offload_optimizer == "nvme" else "offload_param"
    environ = {**os.environ, **plan.worker_env} if environ is None else environ
    if plan.device == "cuda":
        check_cuda_arch_list(environ.get("TORCH_CUDA_ARCH_LIST", ""), which)
    probe = subprocess.run(
        [sys.executable, "-c", ASYNC_IO_PROBE],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        raise ConfigError(
            which,
            "NVMe offload needs DeepSpeed's async I/O op, which cannot be built here "
            "(it compiles against libaio's headers and library)",
            "install them (Debian/Ubuntu: apt-get install libaio-dev; Fedora: dnf install libaio-devel) "
            "and a C compiler, or offload to the CPU instead (--offload cpu)",
        )


# An entry DeepSpeed's CUDA op builder can read: "9.0", "9.0+PTX". Torch also takes
# architecture-specific ones ("9.0a", "10.0f"), and images built for Hopper or Blackwell set them.
_PLAIN_ARCH = re.compile(r"\d+\.\d+(\+PTX)?")
_ARCH_SUFFIX = re.compile(r"(?<=\d)[a-z]+(?=\+PTX|$)")


def check_cuda_arch_list(arch_list: str, field_name: str) -> None:
    """Refuse an arch list with architecture-specific entries before a GPU worker builds the async
    I/O op: DeepSpeed (0.19) reads each entry's minor version with int() and fails deep in the
    worker with "invalid literal for int() with base 10: '0a'"."""
    entries = [entry for entry in arch_list.replace(";", " ").split() if entry]
    specific = [entry for entry in entries if not _PLAIN_ARCH.fullmatch(entry)]
    if not specific:
        return
    plain = list(dict.fromkeys(_ARCH_SUFFIX.sub("", entry) for entry in entries))
    if all(_PLAIN_ARCH.fullmatch(entry) for entry in plain):
        fix = f'run os.environ["TORCH_CUDA_ARCH_LIST"] = "{" ".join(plain)}" in a cell (the same GPUs'
    else:
        fix = 'run os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0" in a cell (your GPUs\' compute capabilities'
    raise ConfigError(
        field_name,
        f"TORCH_CUDA_ARCH_LIST={arch_list!r} has entries that DeepSpeed cannot read when it builds its "
        f"async I/O op for NVMe offload: {', '.join(specific)}",
        f"{fix} without the architecture-specific variants), or offload to the CPU instead (--offload cpu)",
    )


def extensions_folder() -> Path | None:
    """Where torch keeps built extensions for this Python and torch build (torch's own rule)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    if "torch" not in sys.modules:  # a plan is made from a task, so torch is there; never import it here
        return None
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _prebuilt_ops() -> dict[str, bool]:
    """DeepSpeed's record of the ops built at install time (DS_BUILD_OPS=1), read without
    importing DeepSpeed (which the kernel never needs)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    record = Path(spec.submodule_search_locations[0]) / "git_version_info_installed.py"
    try:
        match = re.search(r"installed_ops\s*=\s*(\{.*?\})", record.read_text())
        return ast.literal_eval(match.group(1)) if match else {}
    except (OSError, ValueError, SyntaxError):
        return {}
