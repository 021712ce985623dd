"""The one place that looks at the machine, without initialising CUDA in the kernel.

CUDA must stay uninitialised in the notebook kernel, or forking training workers breaks
("Cannot re-initialize CUDA in forked subprocess").  So GPUs are counted with
``nvidia-smi`` (a separate process) and never with ``torch.cuda`` here; when torch is
already imported we only ask whether CUDA *was* initialised, which initialises nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    compute_capability: float = 0.0


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...] = ()
    cpu_cores: int = 1
    host_memory_bytes: int = 0
    host_available_bytes: int = 0
    bf16_gpu: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def has_cuda(self) -> bool:
        return len(self.gpus) > 0

    @property
    def device_memory_bytes(self) -> int:
        """Memory of one training device: the smallest GPU, or host memory on CPU."""
        if self.gpus:
            return min(g.memory_bytes for g in self.gpus)
        return self.host_memory_bytes


@lru_cache(maxsize=1)
def _query_nvidia_smi() -> tuple[Gpu, ...]:
    """The GPUs, asked once per kernel: they do not change under it (host memory does)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, mib, capability = (part.strip() for part in line.rsplit(",", 2))
        try:
            gpus.append(Gpu(name, int(float(mib)) * 1024 * 1024, float(capability)))
        except ValueError:
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v for v in visible.split(",") if v.strip().isdigit()]
        gpus = [gpus[int(i)] for i in wanted if int(i) < len(gpus)]
    return tuple(gpus)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity and its cgroup's CPU quota (a container's
    or Binder's limit), with hyper-threads counted as one core.

    ``psutil.cpu_count()`` counts the whole host: in a container limited to 2 CPUs on a
    64-core host it says 32 or 64, and that many threads per worker would thrash.
    """
    import psutil

    logical = os.cpu_count() or 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    physical = psutil.cpu_count(logical=False) or logical
    cores = available * physical / logical
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, int(cores))


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``: "QUOTA PERIOD" or "max PERIOD"), or None."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def probe() -> Hardware:
    """Describe this machine now."""
    import psutil

    gpus = _query_nvidia_smi()
    vm = psutil.virtual_memory()
    bf16 = bool(gpus) and all(
        g.compute_capability >= 8.0 for g in gpus
    )  # bf16 tensor cores arrived with Ampere (sm_80)
    return Hardware(
        gpus=gpus,
        cpu_cores=usable_cores(),
        host_memory_bytes=vm.total,
        host_available_bytes=vm.available,
        bf16_gpu=bf16,
    )


def cuda_initialised_in_this_process() -> bool:
    """True when torch is imported here and has initialised CUDA (asking initialises nothing)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_initialized())
