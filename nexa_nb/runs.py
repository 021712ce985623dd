"""The run record: one folder per run, written while it runs, read by anyone afterwards.

    nexa_runs/<task>-<UTC time>/      (or --run-dir)
      run.json       the task's name, when and where it started, the resolved plan
      events.jsonl   every event the sinks saw, one JSON object a line, appended in batches
      result.json    the result (status, history, metrics, error, checkpoint and model folders)
      logs/          each rank's native output (rank0.log, ...)
      model/         the trained model, when no --output-dir or --ckpt-dir says otherwise

The kernel's drain thread appends each batch a worker sent (at most one every 0.1 s per rank,
`launch.EventBatcher`) as one write, so a reader sees whole batches, and a run that dies
mid-write leaves at most one torn last line, which readers ignore. Nothing here imports torch.

No environment variable's value is written: the plan's worker environment is left out, and
the value of a variable with a secret-looking name (a token, a key) is replaced by its name
wherever it would appear (the rule ``%nexa_export`` applies to its files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nexa_nb import events as ev
from nexa_nb.config import resolve_config
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan, make_plan

RUNS_ROOT = "nexa_runs"
POLL_S = 0.1  # a step's events reach the record within 0.1 s of each other: following lags by about that
RUN_FILE, EVENTS_FILE, RESULT_FILE, LOGS_DIR = "run.json", "events.jsonl", "result.json", "logs"
STOP_FILE = "stop"  # written by %nexa_stop; a detached run's process interrupts itself when it appears
EVENT_TYPES = {cls.__name__: cls for cls in ev.HOOKS}
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
SHORTEST_SECRET = 8  # shorter values ("1", "true") would be found in unrelated text


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """value -> name of every environment variable whose name looks secret (a tracker token, an API key)."""
    environ = os.environ if environ is None else environ
    return {
        value: name for name, value in environ.items() if len(value) >= SHORTEST_SECRET and SECRET_NAME.search(name)
    }


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "task"


def new_run_dir(task_name: str, run_dir: str | None = None, now: datetime | None = None) -> Path:
    """Make the run's folder, which no other run has: `run_dir`, or ``nexa_runs/<task>-<UTC time>``.

    The default folder is made with an exclusive mkdir, a suffix (-2, -3, ...) taking the
    next free name, so two runs started in the same second, even from two kernels, get two
    folders. A given `run_dir` that holds a record already is refused.
    """
    if run_dir is not None:
        folder = Path(run_dir)
        if (folder / RUN_FILE).exists():
            raise TrainingError(
                f"run_dir {run_dir!r} holds the record of another run; pass a new folder to --run-dir (run_dir=...)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    base = Path(RUNS_ROOT) / f"{safe_name(task_name)}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


# --- events as JSON lines -------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON's stand-in for a value it has no type for: a number (a 0-d tensor's), else its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def encode(event: ev.Event) -> dict[str, Any]:
    return {"event": type(event).__name__, **dataclasses.asdict(event)}


def decode(data: dict[str, Any]) -> ev.Event:
    fields = dict(data)
    cls = EVENT_TYPES[fields.pop("event")]
    if cls is ev.StepEnd:
        fields["memory"] = ev.MemorySample(**fields["memory"])
    elif cls is ev.RunStarted:
        fields["notes"] = tuple(fields["notes"])
    return cls(**fields)


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The whole lines in `data` and the number of bytes they take; a torn last line is left out."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def parse_events(lines: Iterable[bytes]) -> list[ev.Event]:
    """The events of whole lines; a line that is not one (a writer killed mid-write, then appended to) is skipped."""
    events = []
    for line in lines:
        try:
            events.append(decode(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return events


def history_of(events: Iterable[ev.Event]) -> list[dict[str, Any]]:
    """The history a run's result holds, rebuilt from its events: one entry per step of rank 0."""
    history: list[dict[str, Any]] = []
    procs = 1
    for event in events:
        if isinstance(event, ev.RunStarted):
            procs = event.num_processes
        elif isinstance(event, ev.StepEnd) and event.rank == 0:
            history.append(
                {
                    "step": event.step,
                    "loss": event.loss if event.mean_loss is None else event.mean_loss,
                    "lr": event.lr,
                    "grad_norm": event.grad_norm,
                    "epoch": event.epoch,
                    "samples_per_s": event.samples_per_s * procs,
                }
            )
        elif isinstance(event, ev.EvalEnd) and history:
            history[-1].update({f"eval_{k}": v for k, v in event.metrics.items()})
    return history


# --- writing -----------------------------------------------------------------------------------


def plan_record(plan: Plan) -> dict[str, Any]:
    """What the record keeps of a plan: enough to read it and to make it again (`plan_from_record`)."""
    return {
        "describe": plan.describe(),
        "summary": plan.summary(),
        "config": plan.config.as_dict(),
        "deepspeed_config": plan.deepspeed_config,
        "notes": list(plan.notes),
        "total_params": plan.total_params,
        "largest_layer_params": plan.largest_layer_params,
        "output_dir": plan.output_dir,
    }


def plan_from_record(data: Mapping[str, Any]) -> Plan:
    """The plan of a recorded run, made again from its recorded configuration on this machine."""
    config = resolve_config(environ={}, arguments=dict(data["config"]))
    plan = make_plan(config, total_params=data["total_params"], largest_layer_params=data["largest_layer_params"])
    return dataclasses.replace(plan, notes=tuple(data["notes"]), output_dir=data["output_dir"])


class RunWriter(ev.Sink):
    """Writes one run's record. The drain thread calls `write` with each worker batch; `handle`
    takes the events the kernel itself makes (a retry's note, the end of a failed run)."""

    def __init__(self, folder: Path, plan: Plan):
        self.folder = folder
        self.plan = plan
        self.secrets = secret_values()
        self.logs_dir = folder / LOGS_DIR
        self.logs_dir.mkdir(exist_ok=True)
        self.fd: int | None = os.open(folder / EVENTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @classmethod
    def create(cls, plan: Plan, task_name: str, where: str = "kernel") -> RunWriter:
        """A new record for `plan` (its folder: `new_run_dir`). The default model folder moves into it."""
        c = plan.config
        folder = new_run_dir(task_name, c.run_dir)
        if c.output_dir is None and c.ckpt_dir is None:
            plan = dataclasses.replace(plan, output_dir=str(folder / "model"))
        writer = cls(folder, plan)
        writer.write_json(
            RUN_FILE,
            {
                "task": task_name,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "where": where,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "plan": plan_record(plan),
            },
        )
        return writer

    def redact(self, text: str) -> str:
        for value, name in self.secrets.items():
            text = text.replace(value, f"${name}")
        return text

    def write(self, events: Iterable[ev.Event]) -> None:
        """Append `events` in one write."""
        data = self.redact("".join(json.dumps(encode(e), default=plain) + "\n" for e in events)).encode()
        view = memoryview(data)
        while view and self.fd is not None:
            view = view[os.write(self.fd, view) :]

    def handle(self, event: ev.Event) -> None:
        self.write([event])

    def write_json(self, name: str, data: Any) -> None:
        """Write a JSON file of the record whole: into a temporary file, then renamed."""
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(self.redact(json.dumps(data, indent=1, default=plain)))
        os.replace(tmp, self.folder / name)

    def finish(self, result: Mapping[str, Any]) -> list[str]:
        """Write the result and close the event stream; return the workers' log files."""
        logs = sorted(str(p) for p in self.logs_dir.glob("rank*.log"))
        self.write_json(RESULT_FILE, {**result, "logs": logs})
        self.close()
        return logs

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- reading -----------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs; an ended child its parent has not reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill's answer stands
        return True


class Run:
    """A run's record on disk, read while the run writes it or after it ended."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.offset = 0  # bytes of events.jsonl already returned by `new_events`

    @property
    def name(self) -> str:
        return self.folder.name

    def info(self) -> dict[str, Any]:
        return json.loads((self.folder / RUN_FILE).read_text())

    def result(self) -> dict[str, Any] | None:
        """The result, once the run has ended; None before."""
        try:
            return json.loads((self.folder / RESULT_FILE).read_text())
        except FileNotFoundError:
            return None

    def events(self) -> list[ev.Event]:
        """Every whole event written so far."""
        try:
            data = (self.folder / EVENTS_FILE).read_bytes()
        except FileNotFoundError:
            return []
        return parse_events(complete_lines(data)[0])

    def new_events(self) -> list[ev.Event]:
        """The whole events written since the last call; a line being written waits for the next."""
        try:
            with open(self.folder / EVENTS_FILE, "rb") as f:
                f.seek(self.offset)
                lines, used = complete_lines(f.read())
        except FileNotFoundError:
            return []
        self.offset += used
        return parse_events(lines)

    def replay(self, sinks: Iterable[ev.Sink]) -> None:
        """Hand every recorded event to each sink, in the order the run's own sinks saw them."""
        for event in self.events():
            ev.fan_out(sinks, event)

    def status(self) -> str:
        """ "running" ("pending" for a Slurm job waiting in the queue), an end status ("completed",
        "failed", "interrupted"), or "lost": the process or job that ran it ended without writing
        its end (a kernel restart, a job cancelled by hand)."""
        result = self.result()
        if result is not None:
            return result["status"]
        info = self.info()
        if info.get("slurm_job"):
            from nexa_nb.slurm import job_state

            state = job_state(info["slurm_job"])
            return "pending" if state == "PENDING" else "running" if state else "lost"
        if info["host"] == socket.gethostname() and not process_alive(info["pid"]):
            return "lost"
        return "running"

    def writable(self) -> bool:
        return os.access(self.folder, os.W_OK) and os.access(self.folder / EVENTS_FILE, os.W_OK)


def is_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file()


def find_run(name: str | os.PathLike, root: str | os.PathLike = RUNS_ROOT) -> Run:
    """The run named `name` (its folder name under `root`, or a path), or the error naming the fix."""
    for folder in (Path(name), Path(root) / name):
        if is_run(folder):
            return Run(folder)
    raise TrainingError(
        f"no run record named {str(name)!r} (in {root}/ or as a path); list the runs with %nexa_runs "
        "(nexa_nb.runs_table()) and pass one of their names"
    )


def list_runs(root: str | os.PathLike = RUNS_ROOT) -> list[Run]:
    """The runs recorded under `root`, oldest first."""
    folder = Path(root)
    if not folder.is_dir():
        return []
    found = [Run(p) for p in folder.iterdir() if is_run(p)]
    return sorted(found, key=lambda run: (run.info()["started"], run.name))


def iter_step_losses(events: Iterable[ev.Event]) -> Iterator[tuple[int, float]]:
    """(step, loss) of rank 0, the loss averaged over ranks where known."""
    for event in events:
        if isinstance(event, ev.StepEnd) and event.rank == 0:
            yield event.step, event.loss if event.mean_loss is None else event.mean_loss


# --- following and detached runs ------------------------------------------------------------


def follow(run: Run, sinks: Iterable[ev.Sink], poll: float = POLL_S) -> None:
    """Hand `run`'s events to `sinks`, those written so far and then each batch as it comes, until it ends.

    A run whose process is gone without an end (its kernel restarted) gets a "failed" end in
    the sinks and raises `TrainingError` naming its last checkpoint.
    """
    sinks = list(sinks)
    while True:
        ended = run.result() is not None  # read before the events: the end is then among them
        for event in run.new_events():
            ev.fan_out(sinks, event)
        if ended:
            return
        if run.status() == "lost":
            break
        time.sleep(poll)
    events = run.events()
    message = f"run {run.name} stopped without an end: the process that ran it (pid {run.info()['pid']}) is gone"
    step = max((e.step for e in events if isinstance(e, ev.StepEnd)), default=0)
    checkpoint = next((e.path for e in reversed(events) if isinstance(e, ev.CheckpointSaved)), None)
    ev.fan_out(sinks, ev.RunEnded("failed", step, message=message, checkpoint_dir=checkpoint))
    kept = f"; its last checkpoint: {checkpoint} (--resume it)" if checkpoint else "; it saved no checkpoint"
    raise TrainingError(message + kept)


DETACHED_TASK, DETACHED_PLAN, RUNNER_LOG = "detach.task.pkl", "detach.plan.pkl", "runner.log"


def start_runner(record: RunWriter, task_bytes: bytes) -> int:
    """Start ``python -m nexa_nb.detach RUN_DIR`` for `record`'s run (see `nexa_nb.detach`); its pid.

    `task_bytes` is the task saved by value (`export.task_by_value`). The runner gets a
    session of its own (``setsid``), no terminal, and its output in ``logs/runner.log``: the
    kernel's signals, process group and end do not reach it.
    """
    (record.folder / DETACHED_TASK).write_bytes(task_bytes)
    (record.folder / DETACHED_PLAN).write_bytes(pickle.dumps(record.plan))
    record.close()  # the runner appends to the events from now on
    with open(record.logs_dir / RUNNER_LOG, "ab") as log:
        runner = subprocess.Popen(
            [sys.executable, "-m", "nexa_nb.detach", str(record.folder)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    info = Run(record.folder).info()
    record.write_json(RUN_FILE, {**info, "where": f"detached (pid {runner.pid})", "pid": runner.pid})
    return runner.pid


def start_job(record: RunWriter, task_bytes: bytes, params: dict[str, Any]) -> str:
    """Submit `record`'s run to Slurm (`slurm.submit`), to train as a detached run does; its job id."""
    from nexa_nb.slurm import submit

    (record.folder / DETACHED_TASK).write_bytes(task_bytes)
    (record.folder / DETACHED_PLAN).write_bytes(pickle.dumps(record.plan))
    record.close()
    job = submit(record.folder, params)
    info = Run(record.folder).info()
    record.write_json(RUN_FILE, {**info, "where": f"slurm job {job}", "slurm_job": job})
    return job


def stop(name: str | os.PathLike, root: str | os.PathLike = RUNS_ROOT) -> str:
    """Interrupt a detached run or Slurm job as Ctrl-C interrupts a cell: its workers stop and its
    last complete checkpoint is kept. The request is a file in the record, which the run's own
    process watches (a job's node may be another machine); a job still waiting in the queue is
    cancelled. Refused for a run that has ended, runs in a kernel, or whose record this user
    cannot write."""
    run = find_run(name, root)
    status = run.status()
    if status not in ("running", "pending"):
        raise TrainingError(f"run {run.name} has ended ({status}); there is nothing to stop")
    info = run.info()
    if info["where"] == "kernel":
        raise TrainingError(
            f"run {run.name} runs in a kernel (pid {info['pid']}), not detached; interrupt that kernel to stop it"
        )
    if not run.writable():
        raise TrainingError(f"run {run.name}'s record is not writable by this user; only its owner can stop it")
    (run.folder / STOP_FILE).write_text("")
    if status == "pending":
        from nexa_nb.slurm import cancel

        cancel(info["slurm_job"])
        end_unstarted(run, "cancelled before it started")
        return f"cancelled {run.name} (Slurm job {info['slurm_job']}) before it started"
    return f"stopping {run.name}: its workers stop now, its last complete checkpoint is kept"


def end_unstarted(run: Run, message: str) -> None:
    """The end and result of a run that never started (a job cancelled in the queue)."""
    summary = run.info()["plan"]["summary"]
    writer = RunWriter(run.folder, None)
    writer.write([ev.RunEnded("interrupted", 0, message=message)])
    writer.finish(
        {
            "history": [],
            "final_loss": None,
            "checkpoint_dir": None,
            "distributed_type": summary["distributed_type"],
            "num_processes": summary["procs"],
            "status": "interrupted",
            "message": message,
        }
    )


def watch_for_stop(folder: Path, poll: float = 0.2) -> None:
    """In a detached run's process: interrupt it (SIGINT, as Ctrl-C) once `stop` asks, from a thread."""

    def watch() -> None:
        while not (folder / STOP_FILE).exists():
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="nexa-stop-watch", daemon=True).start()
