"""Run the engine in N processes from inside a Jupyter kernel, through `notebook_launcher`.

What upstream gets wrong on this path, and what this module does about it:

* CPU-only host, several processes, plain ``Accelerator()``: N unsynchronised copies.
  -> the plan passes ``cpu=True`` for plain runs, and the engine refuses to train when
  Accelerate reports another distributed type or world size than planned.
* ``cpu=True`` silently drops a DeepSpeed (or FSDP) plugin.
  -> never passed with DeepSpeed; the engine gives Accelerate the gloo backend instead.
* DeepSpeed in one process without a launcher falls into MPI discovery.
  -> one process is forked like N, through torch's elastic launcher, which sets RANK,
  LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and the kernel stays clean).
* DeepSpeed in two CPU processes: Accelerate and DeepSpeed disagree on the world size.
  -> the explicit backend makes Accelerate count the processes; the DeepSpeed config
  carries an explicit ``train_batch_size``.
* Results do not come back from workers, and prints are all one sees.
  -> workers put events on a fork-context pipe; a thread in the kernel drains it into
  the sinks, and rank 0 sends its outcome last.
* "Address already in use" on a re-run -> a free port is picked for every launch.
* CUDA initialised in the kernel breaks the fork -> refused before launching, with the fix.
* The kernel forks the workers one after another while a thread of its own (the elastic
  agent's store) accepts the first workers' connections. A worker forked while that thread
  held a libc lock (the resolver's, taken to format a peer address) inherits it locked
  and hangs forever in its own first connection.
  -> every worker waits at a barrier until all are forked before it connects anywhere.
* Workers' native output (compilers DeepSpeed runs, C++ warnings) lands in the cell
  -> each rank's file descriptors 1 and 2 go to a log file; what Python code prints
  still shows. The logs are kept, and named in the error, only when a run fails.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Iterable
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from nexa_nb import events as ev
from nexa_nb.engine.outcome import end_stream
from nexa_nb.errors import TrainingError, logger_silenced
from nexa_nb.hardware import cuda_initialised_in_this_process
from nexa_nb.plan import Plan
from nexa_nb.task import Task


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    error_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class WorkerDone:
    """Rank 0's outcome, pickled by the worker itself: a few numbers and names, never weights.

    The final weights stay out of the kernel: rank 0 writes them to the plan's output_dir
    (`nexa_nb.engine.final_model`), and the outcome names that folder.
    """

    payload: bytes


# Modules known to initialise CUDA when imported or used at the top level of a notebook.
_CUDA_INITIALISERS = ("bitsandbytes", "pynvml", "cupy", "numba.cuda", "tensorflow", "jax")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_if_cuda_initialised(plan: Plan) -> None:
    """Every worker is forked from this process, and a forked child cannot use CUDA once its
    parent initialised it ("Cannot re-initialize CUDA in forked subprocess"): refused before
    anything starts, for a single GPU worker too. One CPU worker never touches CUDA, so it may
    be forked; several stay refused, as their process-group set-up may."""
    if not cuda_initialised_in_this_process() or (plan.procs < 2 and plan.device != "cuda"):
        return
    suspects = [m for m in _CUDA_INITIALISERS if m in sys.modules]
    culprit = f" ({', '.join(suspects)} imported in this kernel)" if suspects else ""
    workers = "the worker process" if plan.procs == 1 else f"{plan.procs} worker processes"
    raise TrainingError(
        f"CUDA is already initialised in this kernel{culprit}, so {workers} cannot be forked to use it. "
        "Fix: restart the kernel and keep every CUDA call (model.cuda(), torch.cuda.*, imports such as "
        "bitsandbytes) inside the task's model factory" + ("" if plan.device == "cuda" else ", or pass --procs 1")
    )


def refuse_if_forked_after_cuda(plan: Plan) -> None:
    """In a worker: fail at once, with the fix, when the kernel started the CUDA driver without
    initialising torch's CUDA state (which the kernel-side check sees), e.g. a CUDA device count
    with ``PYTORCH_NVML_BASED_CUDA_CHECK=0``, or torch's own launcher asking for the GPU."""
    if plan.device != "cuda":
        return
    import torch

    if torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "CUDA was started in this kernel before the workers were forked (a CUDA call such as "
            "torch.cuda.device_count() with PYTORCH_NVML_BASED_CUDA_CHECK=0, or a library that uses the GPU), "
            "so this worker cannot use the GPU. Fix: restart the kernel and keep every CUDA call inside the "
            "task's model factory"
        )


def release_openmp_threads() -> None:
    """Let the kernel's OpenMP thread pool go before forking.

    After the kernel ran a multi-threaded torch operation (a matrix product in a cell), GNU
    OpenMP keeps a pool of threads. A forked worker inherits the pool's bookkeeping but not
    its threads, and its first parallel region waits for them forever. OpenMP 5's
    ``omp_pause_resource_all`` ends the pool; the kernel's next parallel region starts a new one.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libraries = sorted({line.split()[-1] for line in maps if "libgomp" in line})
    except OSError:  # not Linux: no GNU OpenMP pool to worry about
        return
    for path in libraries:
        pause = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)  # GCC >= 9
        if pause is not None:
            pause(2)  # omp_pause_hard: the threads and their state


def refuse_if_accelerator_in_kernel() -> None:
    """An Accelerator made in a cell would be inherited, half-initialised, by every worker."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.AcceleratorState._shared_state:
        raise TrainingError(
            "an accelerate Accelerator (or AcceleratorState) was created in this kernel; nexa_nb builds its own "
            "inside each worker. Fix: restart the kernel and remove Accelerator() from your cells"
        )


@contextmanager
def kept_signal_handlers():
    """torch's elastic agent installs its own SIGINT/SIGTERM handlers in the kernel; put ours back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _fork_one(worker, args, port: int) -> None:
    """One worker process, forked the way `notebook_launcher` forks several.

    `notebook_launcher` runs a single process in the kernel itself. That would leave
    DeepSpeed's process groups, Accelerate's singletons and (on a GPU) an initialised
    CUDA context in the kernel, and the next multi-process launch would inherit them.
    Forking one worker keeps the kernel as clean as for N.
    """
    from accelerate.utils import patch_environment
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with patch_environment(PYTORCH_NVML_BASED_CUDA_CHECK="1"):  # it asks torch.cuda.is_available()
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=1,
            run_id="nexa_nb",
            rdzv_endpoint=f"127.0.0.1:{port}",
            rdzv_backend="static",
            rdzv_configs={"rank": 0},
            max_restarts=0,
            monitor_interval=0.1,
            start_method="fork",
        )
    elastic_launch(config=config, entrypoint=worker)(*args)


def native_output_to(path: str) -> None:
    """Send this process's file descriptors 1 and 2 to `path`; Python's own streams keep their target.

    A stream that wrote to descriptor 1 or 2 directly (a script's sys.stdout) is moved to a
    copy of it first. In a kernel, sys.stdout already forwards to the cell without them.
    """
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        try:
            writes_to_fd = stream.fileno() == fd
        except (AttributeError, OSError, ValueError):  # a kernel's or a test's stream
            writes_to_fd = False
        if writes_to_fd:
            stream.flush()
            setattr(sys, name, os.fdopen(os.dup(fd), "w", buffering=1, encoding=stream.encoding, errors=stream.errors))
        os.dup2(log, fd)
    os.close(log)


# How long a forked worker waits for the others to be forked before it gives up.
ALL_FORKED_TIMEOUT_S = 120


def _worker(plan: Plan, task: Task, channel: EventChannel, log_dir: str, all_forked) -> None:
    """Entry point of every rank. Never lets an exception leave without reporting it."""
    from nexa_nb.engine.loop import run

    rank = int(os.environ.get("RANK", "0"))
    native_output_to(os.path.join(log_dir, f"rank{rank}.log"))
    emit = EventBatcher(channel.put)
    try:
        all_forked.wait(ALL_FORKED_TIMEOUT_S)
        if plan.distributed_type == "NO":
            # With these set, Accelerate would report MULTI_CPU/MULTI_GPU for a single process;
            # DeepSpeed and FSDP need them, even for one.
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                os.environ.pop(name, None)
        refuse_if_forked_after_cuda(plan)
        if "OMP_NUM_THREADS" in plan.worker_env:  # torch, already imported in the kernel, reads it no more
            import torch

            torch.set_num_threads(int(plan.worker_env["OMP_NUM_THREADS"]))
        quiet_libraries(rank)
        set_library_log_level(plan.config.log_level)
        outcome = run(plan, task, emit)
        emit.flush()
        if rank == 0:
            channel.put(WorkerDone(pickle.dumps(outcome)))
    except KeyboardInterrupt:
        emit.flush()
        raise
    except BaseException as exc:
        emit.flush()
        channel.put(WorkerFailed(rank, type(exc).__name__, str(exc), traceback.format_exc()))
        raise


class EventBatcher:
    """A worker's events, sent to the kernel in batches: at most one write every `interval`
    seconds while steps are fast, each event at once when they are slow.

    One pipe write and one unpickling in the kernel per step cost a few per cent of the step
    rate of a small model on CPU processes; the dashboard redraws only a few times a second.
    The run's start and end, evaluations, checkpoints and each rank's last step go at once
    (the last step before the final collective operations, so before rank 0 says the run ended).
    """

    URGENT = (ev.RunStarted, ev.RunEnded, ev.EvalEnd, ev.CheckpointSaved)

    def __init__(self, send, interval: float = 0.1):
        self.send = send
        self.interval = interval
        self.pending: list = []
        self.last_sent = -float("inf")

    def __call__(self, event) -> None:
        self.pending.append(event)
        last_step = isinstance(event, ev.StepEnd) and event.step >= event.total_steps
        if isinstance(event, self.URGENT) or last_step or time.monotonic() - self.last_sent >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.send(batch)
        self.last_sent = time.monotonic()


class WithoutLines:
    """A stream without the lines that match `pattern`; everything else passes through.

    In the kernel it drops notebook_launcher's "Launching training on N CUDAs." (said even on
    a CPU host); in a worker, the banners DeepSpeed prints each time it loads a compiled op
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", once per rank
    and run). What the task itself prints is not touched.
    """

    def __init__(self, stream, pattern: str):
        self.stream = stream
        self.pattern = re.compile(pattern)
        self.dropping = False

    def write(self, text: str) -> int:
        if self.pattern.match(text):
            self.dropping = True  # print() writes the newline separately
            return len(text)
        if self.dropping and text == "\n":
            self.dropping = False
            return len(text)
        self.dropping = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


LAUNCH_BANNER = r"Launching training on"
LIBRARY_BANNERS = r"DeepSpeed \S+ built successfully"


def quiet_libraries(rank: int) -> None:
    """Keep out of the cell what the libraries say to no notebook user, and say the rest once.

    Warnings, and transformers' logged ones such as a load report, show on rank 0 only: every
    rank runs the same code and would repeat them. Some
    say nothing to the user at all: DeepSpeed calls torch.distributed functions that torch
    has deprecated, and peft or accelerate ask transformers' deprecated
    ``is_gradient_checkpointing``; those are for the libraries' authors. transformers'
    "Loading weights" progress bars, one per rank while a factory loads a checkpoint, go too.
    """
    if rank > 0:
        warnings.simplefilter("ignore")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
    # DeepSpeed steps the optimizer inside its engine, which Accelerate's scheduler wrapper cannot see.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    sys.stdout = WithoutLines(sys.stdout, LIBRARY_BANNERS)
    if "transformers" in sys.modules:  # imported by the kernel, so a task that uses it: not imported for others
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if rank > 0:  # its log warnings (a from_pretrained's load report, ...) on rank 0 only, like the others
            transformers_logging.set_verbosity_error()


def set_library_log_level(level: str | None) -> None:
    """``--log-level`` / ``ACCELERATE_LOG_LEVEL`` in a worker: the level of accelerate's, DeepSpeed's
    and transformers' loggers (accelerate reads the variable when a logger is made; set both)."""
    if level is None:
        return
    os.environ["ACCELERATE_LOG_LEVEL"] = level.upper()
    for name in ("accelerate", "DeepSpeed", "transformers"):
        logging.getLogger(name).setLevel(level.upper())
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(logging.getLevelName(level.upper()))


class EventChannel:
    """Workers -> kernel: pickled messages over one pipe, the writers taking turns under a lock
    (what multiprocessing's SimpleQueue is), plus a stop pipe of the kernel's own.

    The kernel's reader sleeps until a message or the stop arrives (no polling: a reader that
    wakes 20 times a second takes CPU from a worker on a small machine), and the kernel never
    writes to the workers' pipe: a worker killed by a signal in the middle of a write (the
    elastic agent's SIGTERM or SIGKILL after an interrupt) keeps the writers' lock for good, and
    a write from the kernel would wait on it for ever.
    """

    def __init__(self, context):
        self._reader, self._writer = context.Pipe(duplex=False)
        self._lock = context.Lock()
        self._stop_reader, self._stop_writer = context.Pipe(duplex=False)

    def put(self, message) -> None:
        """Send `message` (a worker's)."""
        data = pickle.dumps(message)
        with self._lock:
            self._writer.send_bytes(data)

    def get(self):
        """The next message (kernel side), or None once `stop` was called and every message sent
        before it was read. A message that cannot be unpickled raises; the next call goes on."""
        while not self._reader.poll():
            if self._stop_reader.poll():
                return None
            wait([self._reader, self._stop_reader])
        return pickle.loads(self._reader.recv_bytes())

    def stop(self) -> None:
        self._stop_writer.send_bytes(b"")

    def close(self) -> None:
        """The kernel's ends; the workers' copies went with them."""
        for end in (self._reader, self._writer, self._stop_reader, self._stop_writer):
            end.close()


class _Drain:
    """A thread that moves worker events from the channel into the sinks (and the run record)."""

    def __init__(self, channel: EventChannel, sinks: Iterable[ev.Sink], record=None):
        """`record`, when given, is the run's `runs.RunWriter`: each batch of events the sinks
        were shown is appended to it in one write."""
        self.channel = channel
        self.sinks = list(sinks)
        self.record = record
        self.outcome = None
        self.failures: list[WorkerFailed] = []
        self.lost: list[str] = []
        self.last_step = 0
        self.ended = False
        self.thread = threading.Thread(target=self._loop, name="nexa-drain", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                item = self.channel.get()
            except (OSError, EOFError):  # the kernel closed the channel after giving up on a torn message
                return
            except Exception as exc:  # an event that cannot be unpickled must not end the drain
                self.lost.append(f"{type(exc).__name__}: {exc}")
                continue
            if item is None:  # the workers have ended and everything they sent is shown
                return
            if isinstance(item, WorkerDone):
                self.outcome = pickle.loads(item.payload)
            elif isinstance(item, WorkerFailed):
                self.failures.append(item)
            else:
                shown = [event for event in item if self._show(event)]  # a batch (EventBatcher)
                if self.record is not None and shown:
                    self._keep(self.record.write, shown)

    def _show(self, event) -> bool:
        """Hand `event` to the sinks; False for a straggler that arrived after the end."""
        if self.ended:  # a straggler of another rank (after an interrupt): the sinks have drawn the end
            return False
        if isinstance(event, ev.StepEnd):
            self.last_step = max(self.last_step, event.step)
        if isinstance(event, ev.RunEnded):
            self.ended = True
        for sink in self.sinks:
            self._keep(sink.handle, event)
        return True

    def _keep(self, write, what) -> None:
        try:
            write(what)
        except Exception:  # a display or disk problem must never stop training
            pass

    def end(self, status: str, message: str, checkpoint_dir: str | None = None) -> None:
        """End the sinks' stream for rank 0, when the run was interrupted or failed before it could."""
        if not self.ended:
            end_stream(self._to_sinks, status, self.last_step, message=message, checkpoint_dir=checkpoint_dir)

    def _to_sinks(self, event) -> None:
        for sink in self.sinks + ([self.record] if self.record is not None else []):
            sink.handle(event)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.channel.stop()
        # A daemon thread: should a killed worker have left half a message, its read never
        # ends, and the kernel goes on without it.
        self.thread.join(timeout=30)


def launch(plan: Plan, task: Task, sinks: Iterable[ev.Sink] = (), record=None) -> Any:
    """Run `task` under `plan` in ``plan.procs`` processes; return rank 0's `engine.outcome.Outcome`.

    A kernel interrupt returns an outcome with status "interrupted"; a worker failure
    raises `TrainingError` naming the rank. `record` (a `runs.RunWriter`) keeps the events
    the sinks see and, in its logs folder, the workers' output; without it the output goes
    to a temporary folder kept only when the run fails.
    """
    from accelerate import notebook_launcher

    refuse_if_cuda_initialised(plan)
    refuse_if_accelerator_in_kernel()
    # A forked worker inherits the kernel's garbage. If it collects an object that owned a
    # thread in the kernel (a previous launch's TCPStore), its destructor joins a thread that
    # does not exist in the child and the worker hangs. Collect here, and hide what is left
    # from the workers' collector.
    gc.collect()
    gc.freeze()
    release_openmp_threads()
    fork = multiprocessing.get_context("fork")
    channel = EventChannel(fork)
    port = free_port()
    log_dir = str(record.logs_dir) if record is not None else tempfile.mkdtemp(prefix="nexa_nb-workers-")
    args = (plan, task, channel, log_dir, fork.Barrier(plan.procs))
    interrupted = False
    launch_error: BaseException | None = None
    with _Drain(channel, sinks, record) as drain:
        try:
            # torch's elastic agent logs every signal it forwards and each failed worker's traceback
            with kept_signal_handlers(), logger_silenced("torch.distributed.elastic"):
                if plan.procs == 1:
                    _fork_one(_worker, args, port)
                else:
                    with redirect_stdout(WithoutLines(sys.stdout, LAUNCH_BANNER)):
                        notebook_launcher(
                            _worker, args=args, num_processes=plan.procs, use_port=str(port), master_addr="127.0.0.1"
                        )
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as exc:  # ChildFailedError, SignalException, a worker's own error
            if type(exc).__name__ == "SignalException":
                interrupted = True
            else:
                launch_error = exc
        finally:
            gc.unfreeze()
    if not drain.thread.is_alive():  # else it waits on a torn message, and its pipe must stay open
        channel.close()
    if interrupted:
        outcome = _interrupted_outcome(plan, drain)
    elif drain.failures or launch_error is not None:
        raise _failure(plan, drain, launch_error, log_dir)
    elif drain.outcome is None:
        lost = f" (messages lost: {'; '.join(drain.lost)})" if drain.lost else ""
        raise TrainingError(
            f"training ended without a result from rank 0{lost}; the workers' output: {_log_files(log_dir)}"
        )
    else:
        outcome = drain.outcome
    if record is None:
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when a run failed
    return outcome


def _log_files(log_dir: str) -> str:
    return os.path.join(log_dir, "rank*.log")


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:]).strip()
    except OSError:
        return ""


def _interrupted_outcome(plan: Plan, drain: _Drain) -> Any:
    from nexa_nb.engine.checkpoints import complete_checkpoints
    from nexa_nb.engine.outcome import Outcome

    if drain.outcome is not None and drain.outcome.status == "interrupted":
        return drain.outcome
    ckpts = complete_checkpoints(plan.config.ckpt_dir) if plan.config.ckpt_dir else []
    checkpoint_dir = str(ckpts[-1]) if ckpts else None
    message = f"interrupted at step {drain.last_step}"
    drain.end("interrupted", message, checkpoint_dir)
    return Outcome(
        status="interrupted",
        history=[],
        final_loss=None,
        eval_metrics={},
        checkpoint_dir=checkpoint_dir,
        distributed_type=plan.distributed_type,
        num_processes=plan.procs,
        message=message,
        notes=list(plan.notes),
    )


def _failure(plan: Plan, drain: _Drain, launch_error: BaseException | None, log_dir: str) -> TrainingError:
    """One error that names the cause, not its echoes.

    When one rank dies, its peers fail too ("Connection closed by peer", or the stop signal
    the agent sends them). The cause is, in order: an out-of-memory error anywhere (the
    caller retries with a smaller micro-batch), a worker's own error, a rank that died
    without a word (killed by a signal), and only then an echo.
    """
    oom = [f for f in drain.failures if f.error_type == "OutOfMemoryError"]
    own = [f for f in drain.failures if not _is_echo(f)]
    reported = {f.rank for f in drain.failures}
    silent = [
        f"rank {r} died without reporting an error (killed by a signal, e.g. SIGKILL or the out-of-memory killer)"
        for r in range(plan.procs)
        if r not in reported
    ]
    killed = _killed_ranks(launch_error) or (silent if drain.failures else [])
    if oom or own:
        first = (oom or own)[0]
        where = f"rank {first.rank}: " if plan.procs > 1 else ""
        kind = "" if first.error_type == "TrainingError" else f"{first.error_type}: "
        error = TrainingError(f"{where}{kind}{first.message}", first.traceback, first.error_type, first.rank)
    elif killed:
        dead = [int(k.split()[1]) for k in killed]
        last_words = "".join(
            f"\nlast output of rank {r}:\n{tail}"
            for r in dead
            if (tail := _tail(os.path.join(log_dir, f"rank{r}.log")))
        )
        error = TrainingError(
            "; ".join(killed) + ". The other workers were stopped. "
            "Fix: run again with --resume latest to continue from the last checkpoint. "
            f"The workers' output: {_log_files(log_dir)}{last_words}"
        )
    elif drain.failures:
        first = drain.failures[0]
        error = TrainingError(
            f"rank {first.rank}: {first.error_type}: {first.message}", first.traceback, first.error_type, first.rank
        )
    else:
        error = TrainingError(
            f"the launch failed: {type(launch_error).__name__}: {launch_error}; "
            f"the workers' output: {_log_files(log_dir)}"
        )
    drain.end("failed", str(error))
    return error


_ECHOES = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")


def _is_echo(failure: WorkerFailed) -> bool:
    """A rank failing because a peer died or the agent stopped it, not for a reason of its own."""
    return failure.error_type == "SignalException" or any(echo in failure.message for echo in _ECHOES)


def _killed_ranks(exc: BaseException | None) -> list[str]:
    """'rank R killed by SIGNAL' for every worker the elastic agent saw die from a signal."""
    killed = []
    for local_rank, failure in sorted((getattr(exc, "failures", None) or {}).items()):
        code = getattr(failure, "exitcode", None)
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            killed.append(f"rank {getattr(failure, 'rank', local_rank)} killed by {name}")
    return killed
