"""``%nexa_status``: devices, versions, the current setup and the last run."""

from __future__ import annotations

import importlib.metadata

from nexa_nb import text
from nexa_nb.config import ConfigError
from nexa_nb.hardware import probe
from nexa_nb.plan import make_plan
from nexa_nb.session import Session

VERSIONED = ("torch", "accelerate", "deepspeed", "transformers", "peft", "nexa-nb")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(session: Session, args) -> None:
    if args.traceback:
        print(session.last_error.worker_traceback if session.last_error else "no worker has failed in this kernel")
        return
    from nexa_nb import api

    hw = probe()
    gpus = ", ".join(f"{g.name} ({text.format_bytes(g.memory_bytes)})" for g in hw.gpus)
    print(
        f"devices: {gpus or 'no GPU (CPU processes)'}; host: {hw.cpu_cores} cores, "
        f"{text.format_bytes(hw.host_memory_bytes)} ({text.format_bytes(hw.host_available_bytes)} available)"
    )
    try:
        print(make_plan(session.resolve()).describe())
    except ConfigError as exc:
        print(f"current defaults do not resolve: {exc}")
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in VERSIONED))
    result = api.last_result()
    if result is not None:
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        print(
            f"last run: {result.status}, {len(result.history)} steps, final loss {loss}, "
            f"{result.distributed_type} x {result.num_processes}"
            + (f", checkpoint {result.checkpoint_dir}" if result.checkpoint_dir else "")
        )
    if session.last_error is not None:
        print(f"last failure: {session.last_error} (%nexa_status --traceback)")
