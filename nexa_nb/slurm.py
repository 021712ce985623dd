"""Slurm jobs from the notebook: ``--slurm "partition=debug,cpus_per_task=2,time=30"``.

The spec is read into submitit's parameters, key by key, each value checked against its
type (a whole number, or a name of letters, digits and ``_.-``), so no text of it reaches a
shell line or an sbatch script as it was typed: ``partition=debug;touch /tmp/x`` is refused
before anything is written. The job is submitted with submitit's `SlurmExecutor`: it runs
``python -m nexa_nb.detach RUN_DIR`` on the node (an argument list, no shell), which trains
the run exactly as a detached run does (forked workers, the record written on the shared
filesystem), so the notebook follows it through its record (``%nexa_attach``) and stops it
as it stops a detached run (``%nexa_stop``: a request in the record, which the job turns
into the interrupt that keeps the last complete checkpoint; a job still waiting in the
queue is cancelled with ``scancel``).

A job runs on one node: the processes of ``--procs`` are forked there. Several nodes need
``%nexa_export`` and ``accelerate launch`` on each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

NAME = re.compile(r"[A-Za-z0-9_.-]+")

# spec key -> (submitit's SlurmExecutor parameter, kind, what the value is)
KEYS: dict[str, tuple[str, str, str]] = {
    "partition": ("partition", "name", "the partition (sbatch --partition)"),
    "nodes": ("nodes", "int", "nodes: 1"),
    "cpus_per_task": ("cpus_per_task", "int", "CPUs for the job's one task (its processes share them)"),
    "time": ("time", "int", "the time limit in minutes"),
    "mem_gb": ("mem", "int", "memory of the node in GB"),
    "gpus_per_node": ("gpus_per_node", "int", "GPUs on the node"),
    "account": ("account", "name", "the account to charge"),
    "qos": ("qos", "name", "the quality of service"),
    "job_name": ("job_name", "name", "the job's name"),
}


def spec_problem(spec: str) -> str | None:
    """What is wrong with a ``--slurm`` spec, or None (the settings' check of the field)."""
    try:
        parse_spec(spec)
    except ValueError as exc:
        return str(exc)
    return None


def parse_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """``"partition=debug,nodes=1,cpus_per_task=2,time=30"`` (or the same as a dict) -> submitit's
    SlurmExecutor parameters. Raises ValueError naming the first bad key or value."""
    items = spec.items() if isinstance(spec, Mapping) else [_pair(part) for part in spec.split(",") if part.strip()]
    params: dict[str, Any] = {}
    for key, raw in items:
        if key not in KEYS:
            raise ValueError(f"{key!r} is not a --slurm key; the keys are {', '.join(KEYS)}")
        name, kind, what = KEYS[key]
        value = str(raw).strip()
        if kind == "int":
            if not value.isdigit() or int(value) < (0 if key == "gpus_per_node" else 1):
                raise ValueError(f"{key}={value!r} is not a whole number ({what})")
            params[name] = int(value)
        else:
            if not NAME.fullmatch(value):
                raise ValueError(f"{key}={value!r} is not a name (letters, digits, _ . - only): {what}")
            params[name] = value
    if params.get("nodes", 1) != 1:
        raise ValueError(
            "a job trains on one node (nodes=1); for several machines write a script with %nexa_export "
            "--num-machines N and start it with accelerate launch on each"
        )
    if "mem" in params:
        params["mem"] = f"{params['mem']}G"
    return params


def _pair(part: str) -> tuple[str, str]:
    key, sep, value = part.partition("=")
    if not sep:
        raise ValueError(f"{part.strip()!r} is not key=value; write e.g. partition=debug,cpus_per_task=2,time=30")
    return key.strip(), value


def spec_text(spec: str | Mapping[str, Any]) -> str:
    """A dict spec (``train(slurm={...})``) as the text the setting holds."""
    return spec if isinstance(spec, str) else ",".join(f"{key}={value}" for key, value in spec.items())


def missing() -> str | None:
    """Why a job cannot be submitted from here, with the fix; None when it can."""
    if shutil.which("sbatch") is None:
        return (
            "Slurm is not installed here (no sbatch on PATH). Fix: run the notebook on a Slurm login node, "
            "install Slurm's client (Debian: apt-get install slurm-client), or drop --slurm"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitting to Slurm needs submitit. Fix: pip install submitit, or drop --slurm"
    return None


def submit(folder, params: Mapping[str, Any]) -> str:
    """Submit the job that trains the run recorded in `folder`; its job id. submitit writes the
    sbatch script and the job's output into ``logs/slurm`` of the record."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder / "logs" / "slurm"), max_num_timeout=0)
    executor.update_parameters(**{"job_name": "nexa", "ntasks_per_node": 1, **params})
    command = submitit.helpers.CommandFunction([sys.executable, "-m", "nexa_nb.detach", str(folder)])
    return str(executor.submit(command).job_id)


def job_state(job_id: str) -> str:
    """The job's state in the queue (PENDING, RUNNING, ...), or "" once it has left it."""
    squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return squeue.stdout.strip() if squeue.returncode == 0 else ""


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, check=False)
