"""A one-node Slurm cluster for the tests: Debian's munge and slurm-wlm, run as root on this machine.

`start` installs the packages with apt-get when they are missing, writes a slurm.conf into a
folder of its own (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none and no accounting,
which a container without cgroup delegation needs), starts munged, slurmctld and slurmd, and
waits until the node takes jobs. `stop` ends the daemons by their process ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")

CONF = """\
ClusterName=nexa
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Unavailable(Exception):
    """Why no cluster can run here (not root, no apt-get): the tests skip with it."""


@dataclass
class Cluster:
    folder: Path
    conf: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def install() -> None:
    if all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if shutil.which("apt-get") is None:
        raise Unavailable("Slurm is not installed and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        if subprocess.run(command, env=env, capture_output=True, timeout=900).returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: no Slurm for these tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, cpus: int = 2) -> Cluster:
    """A running one-node cluster with `cpus` CPUs in partition "debug"; SLURM_CONF names its config."""
    if os.geteuid() != 0:
        raise Unavailable("the test cluster's daemons run as root, and these tests do not")
    install()
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    state, spool = folder / "state", folder / "spool"
    state.mkdir(exist_ok=True)
    spool.mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(
        CONF.format(
            host=host, folder=folder, state=state, spool=spool, cpus=cpus, ctld_port=free_port(), d_port=free_port()
        )
    )
    cluster = Cluster(folder, conf)
    munge_run = Path("/run/munge")
    munge_run.mkdir(parents=True, exist_ok=True)
    shutil.chown(munge_run, "munge", "munge")
    env = dict(os.environ, SLURM_CONF=str(conf))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}  # each writes its log file
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged answering yet
        cluster.processes.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"], **quiet))
        _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")
    cluster.processes.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], **quiet))
    cluster.processes.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], **quiet))
    os.environ["SLURM_CONF"] = str(conf)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
        return out.strip() in ("idle", "mix", "alloc")

    try:
        _wait(idle, "the Slurm node")
    except Unavailable:
        cluster.stop()
        raise
    return cluster


def _wait(ready, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise Unavailable(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.5)
