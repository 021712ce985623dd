"""Activation memory of one training micro-step, traced without allocating it.

The task's model is built under torch's `FakeTensorMode` (a factory is called there; a module
is copied with fake parameters), and one forward, loss and backward of the first batch runs on
fake tensors: every operation computes shapes and dtypes, none allocates data.  Two figures
come out of that trace:

- saved bytes: what autograd keeps for backward (counted by saved-tensor hooks, each storage
  once, parameters left out), at the end of the forward;
- peak bytes: the most that tensors created during the step hold at once, followed operation
  by operation (views share their storage; a tensor counts until it is freed), which adds the
  largest transient of forward and backward to what is saved.  Parameter gradients are dropped
  as soon as they are accumulated: the gradients are model states, counted by `nexa_nb.memory`.

The step runs at two micro-batch sizes (the first batch, and the first batch twice over), so
that bytes per sample and fixed bytes come out of the difference.  It runs as the workers run
it: gradient checkpointing and LoRA as the plan sets them, under autocast for plain mixed
precision, with the model cast to 16 bits under DeepSpeed.  Tensors are traced as CPU tensors,
so attention takes the CPU kernel's path (which, like CUDA's flash and memory-efficient kernels,
keeps no attention matrix for backward).

A model that fake tensors cannot run (its constructor or forward reads tensor values in
Python, as Ultralytics' detectors do) is measured instead: the same two steps on real CPU
tensors, in the process forked for the trace (`trace_apart`), under a limit on that process's
memory, and the plan says so in a note.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import resource
import sys
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nexa_nb.engine.batches import cast_floats, default_forward, extract_loss, map_tensors
from nexa_nb.engine.runtime import apply_lora, enable_gradient_checkpointing
from nexa_nb.errors import TrainingError, logger_silenced
from nexa_nb.memory import ActivationEstimate, count_params
from nexa_nb.mistakes import known_mistake
from nexa_nb.plan import Plan
from nexa_nb.task import Task

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TRACE_TIMEOUT_S = 300  # a model measured on real tensors runs real steps on the CPU


@dataclass(frozen=True)
class StepTrace:
    """Saved and peak bytes of one traced step."""

    saved_bytes: int
    peak_bytes: int


class _LiveBytes(TorchDispatchMode):
    """Follows every storage an operation creates, and the most bytes alive at once."""

    def __init__(self, existing: set):
        super().__init__()
        self.existing = existing
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _CLASS_INDEX_LOSSES:
            _check_class_indices(args[1])
        out = func(*args, **(kwargs or {}))
        self.live = {ref: size for ref, size in self.live.items() if not ref.expired()}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref not in self.existing:
                    self.live.setdefault(ref, storage.nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


_CLASS_INDEX_LOSSES = (torch.ops.aten.nll_loss_forward.default, torch.ops.aten.nll_loss2d_forward.default)


def _check_class_indices(target: torch.Tensor) -> None:
    """The CPU and CUDA kernels' check on class indices, which the shape-only kernels leave out."""
    if target.dtype not in (torch.int64, torch.uint8):
        name = {torch.int32: "Int", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {name.get(target.dtype, target.dtype)}")


def storages(tensors) -> set:
    return {StorageWeakRef(t.untyped_storage()) for t in tensors}


def run_step(model: torch.nn.Module, batch, task: Task, precision: str, *, cast_model: bool, check=None) -> StepTrace:
    """One forward, loss and backward of `batch`, counting saved and peak bytes.

    Runs on whatever tensors `model` and `batch` hold: fake ones for the estimate, real ones to
    check it against.  `cast_model` says that the model and float inputs run in `precision`'s
    dtype (DeepSpeed); otherwise a 16-bit precision runs under autocast (Accelerate).
    """
    existing = storages([*model.parameters(), *model.buffers()])
    saved: dict[StorageWeakRef, int] = {}

    def pack(tensor):
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref not in existing:
            saved.setdefault(ref, tensor.untyped_storage().nbytes())
        return tensor

    dtype = _DTYPES.get(precision)
    if dtype is not None and cast_model:
        batch = cast_floats(batch, dtype)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None and not cast_model else contextlib.nullcontext()
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    live = _LiveBytes(existing)
    model.train()
    try:
        with live:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
                outputs = (task.forward or default_forward)(model, batch)
                loss = extract_loss(outputs, batch, task.loss_fn)
                if check is not None:
                    check(outputs, batch)
            saved_bytes = sum(saved.values())
            del outputs
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return StepTrace(saved_bytes, live.peak)


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def fake_model(task: Task, plan: Plan, mode: FakeTensorMode) -> torch.nn.Module:
    """The task's model as the workers build it (checkpointing, LoRA, precision), on fake tensors.

    A factory is called under `mode`; a module is copied with fake parameters and buffers, so
    that its own weights are neither copied nor changed.
    """
    with mode:
        if task.model_is_factory():
            model = task.build_model()
        else:
            memo = {id(t): _fake_like(t, mode) for t in [*task.model.parameters(), *task.model.buffers()]}
            model = copy.deepcopy(task.model, memo)
        if plan.config.grad_ckpt:
            enable_gradient_checkpointing(model)
    if plan.config.lora:
        # peft moves each new adapter with ``.to()``, which cannot swap fake parameters: the adapters
        # (rank x width, small) are made as real tensors, then replaced by fake ones.
        model = apply_lora(model, plan)
        fake_parameters(model, mode)
    dtype = _DTYPES.get(plan.precision)
    if dtype is not None and plan.uses_deepspeed:
        with mode:
            cast_parameters(model, dtype)
    return model


def fake_parameters(model: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Every real parameter of `model` replaced by a fake one of `mode`."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not isinstance(param, FakeTensor):
                setattr(module, name, _fake_like(param, mode))


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers in `dtype`, as DeepSpeed holds them, tied ones kept tied.

    ``model.to(dtype)`` cannot swap fake parameters in place, so each is replaced by a cast copy.
    """
    cast: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point():
                if id(tensor) not in cast:
                    copy_ = tensor.detach().to(dtype)
                    is_param = isinstance(tensor, torch.nn.Parameter)
                    cast[id(tensor)] = torch.nn.Parameter(copy_, tensor.requires_grad) if is_param else copy_
                setattr(module, name, cast[id(tensor)])


def _fake_like(tensor: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    fake = mode.from_tensor(tensor.detach())
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
    return fake


def doubled(batch, size: int):
    """`batch` with every tensor whose first dimension is the micro-batch repeated once more along it."""
    return map_tensors(lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == size else t, batch)


def estimate_activations(
    task: Task, plan: Plan, batch, micro_batch: int, *, twice=None, built: tuple | None = None, check=None
) -> ActivationEstimate:
    """Activation bytes per sample and fixed, traced on fake tensors at `micro_batch` and twice that.

    `twice` is the batch of ``2 x micro_batch`` samples (default: `doubled`, which repeats the
    batch's tensors only: pass the first samples collated twice over when the batch holds other
    per-sample values, such as texts).  `built` is ``(fake model, its FakeTensorMode)`` when the
    model was built already (the batch must be faked by the model's own mode: another mode would
    copy every parameter as a new tensor); `check(outputs, batch)` sees the first forward's outputs.
    A model or batch that cannot run raises what the real step would (`known_mistake` turns known
    mistakes into their fix).
    """
    if built is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        built = (fake_model(task, plan, mode), mode)
    model, mode = built  # no mode: a real model, measured on the real batch
    traces = []
    for sized in (batch, doubled(batch, micro_batch) if twice is None else twice):
        with mode or contextlib.nullcontext():
            step_batch = map_tensors(mode.from_tensor, sized) if mode else sized
            traces.append(
                run_step(model, step_batch, task, plan.precision, cast_model=plan.uses_deepspeed, check=check)
            )
        check = None
        for p in model.parameters():
            p.grad = None
    (one, two) = traces
    per_sample = max(0, (two.peak_bytes - one.peak_bytes) // micro_batch)
    saved_per_sample = max(0, (two.saved_bytes - one.saved_bytes) // micro_batch)
    return ActivationEstimate(
        per_sample_bytes=per_sample,
        fixed_bytes=max(0, one.peak_bytes - per_sample * micro_batch),
        saved_per_sample_bytes=saved_per_sample,
        saved_fixed_bytes=max(0, one.saved_bytes - saved_per_sample * micro_batch),
        grad_ckpt=plan.config.grad_ckpt,
        precision=plan.precision,
        method="traced" if mode else "measured",
    )


@dataclass(frozen=True)
class FirstStep:
    """What tracing the first step found: the model's size, its activations, and notes for the plan."""

    total_params: int | None = None
    largest_layer_params: int | None = None
    activations: tuple[ActivationEstimate, ...] = ()
    """Without and (when the model can be checkpointed) with gradient checkpointing."""
    notes: tuple[str, ...] = ()


def trace_first_step(task: Task, plan: Plan, batch, check=None, twice=None, measure: bool = False) -> FirstStep:
    """The task's first training step on fake tensors, with and without gradient checkpointing.

    A known mistake in the model, the batch or the loss (`nexa_nb.mistakes`), or a loss the
    engine refuses, raises `TrainingError` with one line naming the fix.  Anything else is not
    refused here (the workers will tell, on real tensors): a model that fake tensors cannot
    build or run (its factory reads files, its forward reads values in Python) is measured on
    real tensors with `measure` (only in a process of its own: see `measure_first_step`), or
    gets a note saying why its activations were not estimated.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    plain_plan = replace(plan, config=replace(plan.config, grad_ckpt=False))
    with logger_silenced("torch._subclasses.fake_tensor"):  # it logs each failed op before raising it
        try:
            model = fake_model(task, plain_plan, mode)
        except Exception as exc:  # a factory that fake tensors cannot run, a LoRA that peft refuses, ...
            if isinstance(exc, TrainingError):
                raise
            why = _not_traced("the model could not be built on fake tensors", exc)
            return measure_first_step(task, plan, batch, twice, why) if measure else FirstStep(notes=(why,))
        total, largest = fake_param_counts(model)
        notes = _lora_note(task, plan)
        try:
            estimates = [
                estimate_activations(
                    task, plain_plan, batch, plan.micro_batch, twice=twice, built=(model, mode), check=check
                )
            ]
        except TrainingError:
            raise
        except Exception as exc:
            mistake = known_mistake(exc, task, batch, model)
            if mistake:
                raise TrainingError(mistake) from None
            failed = _not_traced("its first step failed on fake tensors", exc)
            if measure:
                return measure_first_step(task, plan, batch, twice, failed)
            return FirstStep(total, largest, notes=(*notes, failed))
        estimates += _checkpointed(task, plan, batch, twice)
    return FirstStep(total, largest, tuple(estimates), notes)


def measure_first_step(task: Task, plan: Plan, batch, twice, why: str) -> FirstStep:
    """The first step (without gradient checkpointing) on a real model and batch, for a model
    that fake tensors cannot run; `why` is the note to give when that fails too.

    It builds the whole model in this process, so it runs only in the process `trace_apart`
    forks, whose memory it limits to half of what the machine has available: a model too large
    for that fails to build here and gets the note, before any worker starts.
    """
    import psutil

    plain_plan = replace(plan, config=replace(plan.config, grad_ckpt=False))
    # One thread: GNU OpenMP's threads do not survive a fork, and a process forked from a kernel
    # that has run parallel torch work waits for them for ever at its first parallel operation.
    torch.set_num_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + psutil.virtual_memory().available // 2
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        model = real_model(task, plain_plan)
        total, largest = count_params(model)
        estimate = estimate_activations(task, plain_plan, batch, plan.micro_batch, twice=twice, built=(model, None))
    except TrainingError:
        raise
    except Exception as exc:  # a MemoryError under the limit included
        return FirstStep(notes=(f"{why}; measuring it on real tensors failed too ({type(exc).__name__})",))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    cause = why.removeprefix("activations not estimated: ").split("; ")[0]
    note = f"activations measured on real tensors in a separate process, as fake tensors could not trace them: {cause}"
    return FirstStep(total, largest, (estimate,), notes=(*_lora_note(task, plan), note))


def real_model(task: Task, plan: Plan) -> torch.nn.Module:
    """The task's model as the workers build it (LoRA, precision), on real tensors; a module
    instance is used as it is (this runs in a forked process, whose changes stay there)."""
    model = task.build_model() if task.model_is_factory() else task.model
    if plan.config.lora:
        model = apply_lora(model, plan)
    dtype = _DTYPES.get(plan.precision)
    if dtype is not None and plan.uses_deepspeed:
        model = model.to(dtype)
    return model


def trace_apart(task: Task, plan: Plan, batch, check=None, twice=None) -> FirstStep:
    """`trace_first_step` in a process forked for it, which ends with the trace.

    The task's factory, forward and loss are the user's code, run before any worker exists:
    what they change (a counter in a callable object, a file, the process itself: a factory
    may even end it) stays in that process, and the workers, forked from the kernel later,
    start from the state the user left; what they print is not shown (the workers print it).
    The kernel gets back the result or the error's line; a process that ends without either, or
    has not told within `TRACE_TIMEOUT_S`, gives a note (and is ended).
    """
    fork = multiprocessing.get_context("fork")
    reader, writer = fork.Pipe(duplex=False)

    def run() -> None:
        _silenced()
        try:
            writer.send(("traced", trace_first_step(task, plan, batch, check, twice, measure=True)))
        except TrainingError as exc:
            writer.send(("refused", str(exc)))
        except BaseException as exc:  # the trace's own failure is no reason to refuse the run
            writer.send(("traced", FirstStep(notes=(_not_traced("tracing the first step failed", exc),))))

    child = fork.Process(target=run, name="nexa-trace", daemon=True)
    child.start()
    writer.close()
    try:
        if not reader.poll(TRACE_TIMEOUT_S):
            child.kill()
            raise EOFError(f"the first step took more than {TRACE_TIMEOUT_S} s to trace")
        kind, value = reader.recv()
    except EOFError as exc:
        child.join()
        ended = (
            str(exc) or f"the process tracing the first step ended before it could tell (exit code {child.exitcode})"
        )
        kind, value = "traced", FirstStep(notes=(f"activations not estimated: {ended}",))
    finally:
        reader.close()
        child.join()
    if kind == "refused":
        raise TrainingError(value)
    return value


def fake_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """`nexa_nb.memory.count_params` for a model on fake tensors, which have no data address to
    tell shared parameters apart by: their storages do."""
    sizes = {StorageWeakRef(p.untyped_storage()): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(sizes.values()), largest


def _checkpointed(task: Task, plan: Plan, batch, twice) -> list[ActivationEstimate]:
    """The estimate with gradient checkpointing, or none when the model has nothing to checkpoint."""
    checkpointed = replace(plan, config=replace(plan.config, grad_ckpt=True))
    try:
        return [estimate_activations(task, checkpointed, batch, plan.micro_batch, twice=twice)]
    except TrainingError:  # no sub-module to checkpoint
        return []


def _not_traced(why: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"activations not estimated: {why} ({type(exc).__name__}: {first[:120]}); "
        "the memory plan counts model states only"
    )


def _lora_note(task: Task, plan: Plan) -> tuple[str, ...]:
    """Which layers LoRA adapts in a module of the user's own, where peft has no default to go by."""
    c = plan.config
    if not c.lora or c.lora_target_modules:
        return ()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = fake_model(task, replace(plan, config=replace(c, lora=False, grad_ckpt=False)), mode)
    if hasattr(model, "config"):
        return ()
    names = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return (
        f"LoRA on a module of your own adapts every nn.Linear: {layers} layer(s) named {', '.join(names)}; "
        "pass --lora-target-modules NAMES to choose",
    )


def _silenced() -> None:
    """This process's output, native and Python, to /dev/null: the user's code prints in the workers,
    once per rank, not in the trace (its result and error come back through a pipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (open until the process ends)
