"""How much memory the model states take, and which ZeRO setup fits the memory at hand.

"Model states" are parameters, gradients and optimizer state, the part of training memory
that ZeRO partitions and offloads.  The numbers are DeepSpeed's own estimates
(``estimate_zero2_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage_1_and_2.py`` and
``estimate_zero3_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage3.py``), redone
here with the same arithmetic so that this module imports neither torch nor DeepSpeed.
As in DeepSpeed, device bytes are per device and host bytes are per node.

Beside model states, a device holds activations (`ActivationEstimate`, traced from the task's
first step by `nexa_nb.activations`) and the framework's own memory (`framework_bytes`); `fit`
finds the largest micro-batch of one setup within ``(max_memory_usage - memory_safety_margin)
x capacity`` (`usable_bytes`), with gradient checkpointing when activations need it, and
`recommend` the fastest setup that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nexa_nb.config import OFFLOAD_DEVICES
from nexa_nb.events import RunStarted, Sink, StepEnd
from nexa_nb.text import format_bytes

STAGES = (None, 0, 1, 2, 3)

# Bytes per parameter in DeepSpeed's estimators.
_FP32 = 4  # an fp32 copy: what each process loads on the host; also 4 x the largest layer
_FP16_PARAMS = 2  # the 16-bit parameters (below stage 3 every device holds all of them)
_ZERO2_PARTITIONED = 18  # 2 16-bit grads + 4 fp32 grads + 4 fp32 params + 8 Adam moments, as DeepSpeed counts
_ZERO2_OFFLOAD_MIN = 16  # ZeRO-2 offload host bytes are DeepSpeed's max(4 x GPUs, 16) per parameter
_ZERO3_OPTIMIZER = 16  # what ZeRO-3 optimizer offload takes off the device: its 18 less the 16-bit params
_PLAIN_FP32_ADAMW = 16  # no DeepSpeed: fp32 weights 4 + grads 4 + two Adam moments 8


@dataclass(frozen=True)
class StateMemory:
    """Model-state memory of one setup: ``device_bytes`` per device, ``host_bytes`` per node."""

    stage: int | None
    offload_optimizer: str
    offload_param: str
    device_bytes: int
    host_bytes: int


def model_state_memory(
    total_params: int,
    largest_layer_params: int,
    *,
    stage: int | None,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    gpus_per_node: int = 1,
    num_nodes: int = 1,
    zero_init: bool = True,  # DeepSpeed's default; Accelerate turns zero.Init on for stage 3 by default
    additional_buffer_factor: float = 1.5,  # DeepSpeed's default margin on host memory
    weight_bytes: int = 2,  # 16-bit weights and gradients, as DeepSpeed's estimators assume
) -> StateMemory:
    """Model-state bytes per device and per node's host for one ZeRO setup.

    With ``weight_bytes=4`` (fp32 training under DeepSpeed) every 16-bit term of DeepSpeed's
    arithmetic (the weights, their gradients, the gathered largest layer) takes 4 bytes, and
    stage 0 runs no ZeRO optimizer at all but the plain torch one: 16 bytes per parameter.
    The host bytes do not change.

    - Stages 1 and 2: DeepSpeed runs both with one optimizer and has one estimator for both,
      ``estimate_zero2_model_states_mem_needs`` (cpu_offload = optimizer offloaded), so they
      get the same numbers.  Stage 1 really keeps full gradients, so it is the optimistic one.
    - Stage 3: ``estimate_zero3_model_states_mem_needs`` (cpu_offload = optimizer offloaded,
      cpu_offload_params = parameters offloaded).  DeepSpeed has no row for parameter offload
      without optimizer offload; it is counted the same way: the 2 bytes of 16-bit parameters
      leave the device, the other 16 of the 18 partitioned bytes stay.
    - Stage 0 (DeepSpeed without partitioning): the ZeRO-2 formula with the 18-byte term not
      divided by the device count, 2 + 18 = 20 bytes per parameter.
    - Stage None (plain Accelerate / DDP): fp32 AdamW, 16 bytes per parameter.
    - Host bytes of stages None, 0, 1 and 2 without offload: DeepSpeed's no-offload term,
      every process on the node loading an fp32 copy (times the buffer factor).
    - NVMe counts like cpu on the device.  On the host: stages 1 and 2 have no NVMe swapper
      (DeepSpeed's optimizer treats any offload device as cpu), so the state stays in host
      memory and host bytes equal cpu's.  Stage 3 swaps what goes to NVMe out of host memory,
      so host bytes count only what is offloaded to cpu; the pinned staging buffers sized by
      the aio / offload config are not counted.
    """
    _check_sizes(total_params, largest_layer_params, gpus_per_node, num_nodes)
    _check_setup(stage, offload_optimizer, offload_param)
    if additional_buffer_factor < 1:
        raise ValueError(
            f"additional_buffer_factor must be at least 1, got {additional_buffer_factor}; "
            "pass 1.5 (DeepSpeed's default)"
        )

    if weight_bytes not in (2, 4):
        raise ValueError(f"weight_bytes must be 2 (fp16, bf16) or 4 (fp32), got {weight_bytes}")
    weights, partitioned = weight_bytes, _ZERO2_PARTITIONED + weight_bytes - _FP16_PARAMS
    total_gpus = gpus_per_node * num_nodes
    host_fp32_copies = total_params * _FP32 * gpus_per_node * additional_buffer_factor
    if stage is None:
        device = _PLAIN_FP32_ADAMW * total_params
        host = host_fp32_copies
    elif stage == 0:
        device = (weights + partitioned if weight_bytes == 2 else _PLAIN_FP32_ADAMW) * total_params
        host = host_fp32_copies
    elif stage in (1, 2):
        if offload_optimizer != "none":
            device = weights * total_params
            # DeepSpeed counts the GPUs of all nodes here, not of one node; kept to stay equal to it.
            host = total_params * max(_FP32 * total_gpus, _ZERO2_OFFLOAD_MIN) * additional_buffer_factor
        else:
            device = weights * total_params + int(partitioned * total_params / total_gpus)
            host = host_fp32_copies
    else:
        on_device = (weights if offload_param == "none" else 0) + (
            _ZERO3_OPTIMIZER + weights - _FP16_PARAMS if offload_optimizer == "none" else 0
        )
        device = 2 * weights * largest_layer_params + int(on_device * total_params / total_gpus)
        on_host = (_FP16_PARAMS if offload_param == "cpu" else 0) + (
            _ZERO3_OPTIMIZER if offload_optimizer == "cpu" else 0
        )
        gpus_factor = 1 / num_nodes
        if on_host == 0:
            loaded = largest_layer_params if zero_init else total_params
            host = loaded * _FP32 * gpus_per_node * additional_buffer_factor
        elif zero_init:
            host = total_params * on_host * gpus_factor * additional_buffer_factor
        else:
            host = total_params * max(_FP32 * gpus_per_node, on_host * gpus_factor) * additional_buffer_factor
    return StateMemory(stage, offload_optimizer, offload_param, int(device), int(host))


# The setups worth comparing: (stage, offload_optimizer, offload_param).
_TABLE_SETUPS = (
    (None, "none", "none"),
    (0, "none", "none"),
    (1, "none", "none"),
    (2, "none", "none"),
    (2, "cpu", "none"),
    (3, "none", "none"),
    (3, "cpu", "none"),
    (3, "cpu", "cpu"),
)


def memory_table(
    total_params: int,
    largest_layer_params: int,
    *,
    gpus_per_node: int = 1,
    num_nodes: int = 1,
    weight_bytes: int = 2,
) -> list[StateMemory]:
    """One row per setup worth comparing, from plain Accelerate to ZeRO-3 with full cpu offload."""
    return _rows(total_params, largest_layer_params, _TABLE_SETUPS, gpus_per_node, num_nodes, weight_bytes)


def nvme_rows(
    total_params: int,
    largest_layer_params: int,
    *,
    gpus_per_node: int = 1,
    num_nodes: int = 1,
    weight_bytes: int = 2,
) -> list[tuple[StateMemory, int]]:
    """ZeRO-3 with the optimizer, then also the parameters, offloaded to NVMe: each row with the
    bytes it swaps to the NVMe disk of a node, what cpu offload would put in host memory (the
    node's share of the optimizer state and 16-bit parameters; the pinned staging buffers stay in
    host memory, uncounted)."""
    rows = _rows(total_params, largest_layer_params, _NVME_SETUPS, gpus_per_node, num_nodes, weight_bytes)
    return [(row, _on_nvme(row) * total_params // num_nodes) for row in rows]


def _on_nvme(row: StateMemory) -> int:
    """Bytes per parameter a ZeRO-3 setup swaps to NVMe (the same terms as its host bytes with cpu offload)."""
    params = _FP16_PARAMS if row.offload_param == "nvme" else 0
    return params + (_ZERO3_OPTIMIZER if row.offload_optimizer == "nvme" else 0)


_NVME_SETUPS = ((3, "nvme", "none"), (3, "nvme", "nvme"))


def _rows(
    total_params: int, largest_layer_params: int, setups, gpus_per_node: int, num_nodes: int, weight_bytes: int = 2
) -> list:
    """The model-state memory of each (stage, optimizer offload, parameter offload) in `setups`."""
    return [
        model_state_memory(
            total_params,
            largest_layer_params,
            stage=stage,
            offload_optimizer=opt,
            offload_param=param,
            gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            weight_bytes=weight_bytes,
        )
        for stage, opt, param in setups
    ]


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-step on one device: ``fixed_bytes + per_sample_bytes x micro-batch``.

    ``per_sample_bytes`` and ``fixed_bytes`` are the step's peak (what autograd saves for backward
    plus the largest transient); the ``saved_*`` figures are what autograd saves alone.
    ``method`` says where the figures come from: "traced" (`nexa_nb.activations`, on fake
    tensors), "measured" (the same, on real tensors, for a model fake tensors cannot run) or
    "given" (by the caller).
    """

    per_sample_bytes: int
    fixed_bytes: int = 0
    saved_per_sample_bytes: int = 0
    saved_fixed_bytes: int = 0
    grad_ckpt: bool = False
    precision: str = "no"
    method: str = "given"

    def at(self, micro_batch: int) -> int:
        """Peak activation bytes at `micro_batch`."""
        return self.fixed_bytes + self.per_sample_bytes * micro_batch


@dataclass(frozen=True)
class Fit:
    """How one setup fits: the largest micro-batch, with or without gradient checkpointing."""

    row: StateMemory
    micro_batch: int | None
    """None when not even micro-batch 1 fits (or the model states alone do not)."""
    activations: ActivationEstimate | None
    overhead_bytes: int
    """The framework's own memory per device (`framework_bytes`)."""

    @property
    def grad_ckpt(self) -> bool | None:
        return None if self.activations is None else self.activations.grad_ckpt

    @property
    def activation_bytes(self) -> int | None:
        return None if self.activations is None else self.activations.at(self.micro_batch or 1)

    @property
    def device_bytes(self) -> int:
        """Model states + framework overhead + activations at the micro-batch (at 1 when nothing fits)."""
        return self.row.device_bytes + self.overhead_bytes + (self.activation_bytes or 0)


@dataclass(frozen=True)
class Recommendation:
    """The setup to train with.  ``device_bytes`` is model states, the framework's overhead and,
    when they were estimated, activations at ``micro_batch``, per device; ``micro_batch`` x
    ``grad_accum`` is the samples per process per optimizer step that were asked for."""

    stage: int | None
    offload_optimizer: str
    offload_param: str
    micro_batch: int | None
    device_bytes: int
    reason: str
    grad_accum: int = 1
    grad_ckpt: bool | None = None
    """Whether to checkpoint; None when activations were not estimated."""
    activation_bytes: int | None = None


# Fastest first, the order the Transformers DeepSpeed guide gives: DDP > ZeRO-2 > ZeRO-2 + offload
# > ZeRO-3 > ZeRO-3 + offloads.  Stage 0 is left out because it needs more than plain Accelerate
# and saves nothing; stage 1 because its estimate equals stage 2's while it really keeps full
# gradients, for the same communication volume.
_SPEED_ORDER = (
    (None, "none", "none"),
    (2, "none", "none"),
    (2, "cpu", "none"),
    (3, "none", "none"),
    (3, "cpu", "none"),
    (3, "cpu", "cpu"),
)

MAX_MEMORY_USAGE = 0.9  # the share of a device training may plan to use (the rest: allocator slack, fragmentation)
MEMORY_SAFETY_MARGIN = 0.1  # a further share kept free, for what no estimate sees (inputs longer than the first batch)
CUDA_CONTEXT_BYTES = 512 * 2**20  # the CUDA context and cuBLAS workspace, outside torch's allocator
CPU_WORKER_BYTES = 400 * 2**20  # a CPU worker's torch, Accelerate and DeepSpeed: 383 MiB of RSS once imported
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000  # plan.py's reduce and allgather bucket sizes (DeepSpeed's defaults)
DEEPSPEED_BUCKET_BYTES = 2 * DEEPSPEED_BUCKET_ELEMENTS * 2  # the two buckets, full, of 16-bit elements


def usable_bytes(
    capacity: int, max_memory_usage: float = MAX_MEMORY_USAGE, memory_safety_margin: float = MEMORY_SAFETY_MARGIN
) -> int:
    """What training may plan to use of a device of `capacity` bytes: (usage - margin) x capacity."""
    check_usage(max_memory_usage, memory_safety_margin)
    return int((max_memory_usage - memory_safety_margin) * capacity)


def check_usage(max_memory_usage: float, memory_safety_margin: float) -> None:
    """The two shares of a device, refused with the fix when they leave nothing or more than all."""
    if not 0 < max_memory_usage <= 1:
        raise ValueError(
            f"max_memory_usage must be in (0, 1], got {max_memory_usage}; pass 0.9 to plan with 90% of each device"
        )
    if not 0 <= memory_safety_margin < max_memory_usage:
        raise ValueError(
            f"memory_safety_margin must be at least 0 and below max_memory_usage ({max_memory_usage}), got "
            f"{memory_safety_margin}; pass 0.1 to keep 10% of each device spare"
        )


def framework_bytes(row: StateMemory, base_bytes: int, total_params: int | None = None) -> int:
    """What the framework holds beside model states and activations: `base_bytes` (a CUDA context,
    or a worker's libraries on a CPU), plus ZeRO's reduce and allgather buckets, which hold at most
    the model's gradients or parameters (`total_params`; unknown: full)."""
    if row.stage in (None, 0):
        return base_bytes
    elements = DEEPSPEED_BUCKET_ELEMENTS if total_params is None else min(total_params, DEEPSPEED_BUCKET_ELEMENTS)
    return base_bytes + DEEPSPEED_BUCKET_BYTES * elements // DEEPSPEED_BUCKET_ELEMENTS


def micro_batches(samples_per_step: int) -> list[int]:
    """The micro-batches that reach `samples_per_step` per process by accumulation, largest first."""
    return [mb for mb in range(samples_per_step, 0, -1) if samples_per_step % mb == 0]


def fit(
    row: StateMemory,
    budget: int,
    samples_per_step: int,
    activations: tuple[ActivationEstimate, ...] = (),
    base_bytes: int = 0,
    total_params: int | None = None,
) -> Fit:
    """The largest micro-batch dividing `samples_per_step` that fits `row` in `budget` bytes.

    Without checkpointing first: it is kept when it fits the whole `samples_per_step`, or when
    checkpointing would not fit a larger micro-batch; otherwise checkpointing is turned on
    (recomputing costs about a third more compute, less than the accumulation steps it saves).
    Without `activations`, the micro-batch is `samples_per_step`, unchecked.
    """
    overhead = framework_bytes(row, base_bytes, total_params)
    states = row.device_bytes + overhead
    if not activations:
        return Fit(row, samples_per_step if states <= budget else None, None, overhead)
    best = None
    for estimate in sorted(activations, key=lambda e: e.grad_ckpt):
        micro = next((mb for mb in micro_batches(samples_per_step) if states + estimate.at(mb) <= budget), None)
        if micro is not None and (best is None or micro > best.micro_batch):
            best = Fit(row, micro, estimate, overhead)
        if micro == samples_per_step:
            break
    return best or Fit(row, None, min(activations, key=lambda e: e.at(1)), overhead)


def fits_table(
    rows: list[StateMemory],
    budget: int,
    samples_per_step: int,
    activations: tuple[ActivationEstimate, ...] = (),
    base_bytes: int = 0,
    total_params: int | None = None,
) -> list[Fit]:
    """`fit` for every row: what each setup would train with."""
    return [fit(row, budget, samples_per_step, activations, base_bytes, total_params) for row in rows]


def _check_budget(
    device_bytes_available: int,
    host_bytes_available: int,
    wanted_micro_batch: int,
    activation_bytes_per_sample: int | None,
) -> None:
    """`recommend`'s memory figures, refused with the fix when they cannot be right."""
    if device_bytes_available <= 0:
        raise ValueError(
            f"device_bytes_available must be positive, got {device_bytes_available}; "
            "pass the memory of one training device in bytes"
        )
    if host_bytes_available < 0:
        raise ValueError(
            f"host_bytes_available must not be negative, got {host_bytes_available}; "
            "pass the host memory of one node in bytes"
        )
    if wanted_micro_batch < 1:
        raise ValueError(f"wanted_micro_batch must be at least 1, got {wanted_micro_batch}")
    if activation_bytes_per_sample is not None and activation_bytes_per_sample < 0:
        raise ValueError(
            f"activation_bytes_per_sample must not be negative, got {activation_bytes_per_sample}; "
            "pass None when it is not known"
        )


def _needs(f: Fit, micro_batch: int) -> str:
    activations = None if f.activations is None else f.activations.at(micro_batch)
    parts = [f"{format_bytes(f.row.device_bytes)} of model states"]
    if f.overhead_bytes:
        parts.append(f"{format_bytes(f.overhead_bytes)} of framework overhead")
    if activations is not None:
        checkpointed = ", checkpointed" if f.grad_ckpt else ""
        parts.append(f"{format_bytes(activations)} of activations at micro-batch {micro_batch}{checkpointed}")
    total = f.row.device_bytes + f.overhead_bytes + (activations or 0)
    return f"{format_bytes(total)} per device ({' + '.join(parts)}) and {format_bytes(f.row.host_bytes)} of host memory"


def recommend(
    total_params: int,
    largest_layer_params: int,
    *,
    device_bytes_available: int,
    host_bytes_available: int,
    gpus_per_node: int = 1,
    num_nodes: int = 1,
    activations: tuple[ActivationEstimate, ...] = (),
    activation_bytes_per_sample: int | None = None,
    wanted_micro_batch: int = 8,  # a common micro-batch for fine-tuning; the caller's choice wins
    max_memory_usage: float = MAX_MEMORY_USAGE,
    memory_safety_margin: float = MEMORY_SAFETY_MARGIN,
    framework_base_bytes: int = CUDA_CONTEXT_BYTES,
    weight_bytes: int = 2,
) -> Recommendation:
    """The fastest setup whose model states and activations fit, its micro-batch and checkpointing.

    Setups are tried fastest first: plain Accelerate, ZeRO-2, ZeRO-2 with cpu optimizer
    offload, ZeRO-3, ZeRO-3 with cpu optimizer offload, ZeRO-3 with cpu optimizer and
    parameter offload.  On one device ZeRO shards nothing, so its stages without offload
    need more than plain Accelerate and never win; offload is the only lever there.  On
    several devices the lower stages communicate less: ZeRO-2 moves as much as DDP, ZeRO-3
    gathers every parameter in forward and backward on top, which (as the Transformers
    DeepSpeed guide ranks them) costs more than offloading ZeRO-2's optimizer step.

    A setup fits when model states, the framework's overhead (`framework_base_bytes`, plus
    ZeRO's buckets) and activations at the micro-batch stay within
    ``(max_memory_usage - memory_safety_margin) x device_bytes_available`` per device, and its
    host bytes within ``host_bytes_available`` (per node).  `activations` are estimates with
    and without gradient checkpointing (`nexa_nb.activations`); `activation_bytes_per_sample`
    is the short form of one without.  The micro-batch is the largest divisor of
    ``wanted_micro_batch`` (the samples each process takes per optimizer step) that fits,
    accumulation making up the rest (`fit`); a faster setup with a smaller micro-batch beats a
    slower one, since accumulation restores the effective batch for less than offload costs.
    Without activations, the micro-batch is the wanted one, unchecked.  When nothing fits, the
    setup needing the least device memory is returned (host memory can be stretched with NVMe
    offload, device memory cannot), with a reason that says by how much it misses.
    """
    _check_sizes(total_params, largest_layer_params, gpus_per_node, num_nodes)
    _check_budget(device_bytes_available, host_bytes_available, wanted_micro_batch, activation_bytes_per_sample)
    budget = usable_bytes(device_bytes_available, max_memory_usage, memory_safety_margin)
    if activation_bytes_per_sample is not None:
        activations = (*activations, ActivationEstimate(activation_bytes_per_sample))
    usable = (
        f"{format_bytes(budget)} usable ({max_memory_usage:.0%} less a {memory_safety_margin:.0%} margin of "
        f"{format_bytes(device_bytes_available)})"
    )
    host_available = format_bytes(host_bytes_available)
    rows = _rows(total_params, largest_layer_params, _SPEED_ORDER, gpus_per_node, num_nodes, weight_bytes)
    fits = fits_table(rows, budget, wanted_micro_batch, tuple(activations), framework_base_bytes, total_params)

    for i, f in enumerate(fits):
        if f.micro_batch is None or f.row.host_bytes > host_bytes_available:
            continue
        reason = (
            f"{_label(f.row)} fits: it needs {_needs(f, f.micro_batch)}, within {usable} per device "
            f"and {host_available} of host memory"
        )
        if i > 0:
            reason += f"; the faster {_label(rows[i - 1])} would need {_needs(fits[i - 1], 1)}"
        reason += "."
        if not activations:
            reason += f" Activations were not estimated, so micro-batch {f.micro_batch} is unchecked."
        return _recommendation(f, wanted_micro_batch, _capitalized(reason))

    frugal = min(fits, key=lambda f: f.device_bytes)
    micro_batch = wanted_micro_batch if not activations else 1
    misses, fixes = [], []
    if frugal.device_bytes > budget:
        misses.append(f"{format_bytes(frugal.device_bytes - budget)} more per device than the {usable}")
        fixes.append("add devices or nodes, or train a smaller model or LoRA adapters")
    if frugal.row.host_bytes > host_bytes_available:
        misses.append(
            f"{format_bytes(frugal.row.host_bytes - host_bytes_available)} more host memory than the "
            f"{host_available} available"
        )
        fixes.append("offload to NVMe with ZeRO-3 to keep that state out of host memory")
    reason = (
        f"Nothing fits, and this will not fit either: {_label(frugal.row)}, the setup needing the least "
        f"device memory, needs {_needs(frugal, micro_batch)}, which is {' and '.join(misses)}. "
        f"{_capitalized('; '.join(fixes))}."
    )
    return _recommendation(replace(frugal, micro_batch=micro_batch), wanted_micro_batch, reason)


def _recommendation(f: Fit, wanted: int, reason: str) -> Recommendation:
    return Recommendation(
        f.row.stage,
        f.row.offload_optimizer,
        f.row.offload_param,
        f.micro_batch,
        f.device_bytes,
        reason,
        grad_accum=wanted // f.micro_batch,
        grad_ckpt=f.grad_ckpt,
        activation_bytes=f.activation_bytes,
    )


def count_params(model) -> tuple[int, int]:
    """(total parameters, largest layer's parameters), as DeepSpeed's model-based estimators
    count them: parameters sharing storage once, and the largest layer as the most parameters
    any module holds itself (``recurse=False``).

    One difference: DeepSpeed tells shared parameters apart by ``data_ptr()``, which is 0 for
    every tensor on the meta device, so a model built there would count as one parameter
    tensor.  Meta parameters are told apart by identity instead.
    """
    sizes = {}
    for p in model.parameters():
        sizes[id(p) if p.is_meta else p.data_ptr()] = p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(sizes.values()), largest


def _label(row: StateMemory) -> str:
    if row.stage is None:
        return "plain Accelerate (no DeepSpeed)"
    offloaded = [
        f"{name} offload to {device}"
        for name, device in (("optimizer", row.offload_optimizer), ("parameter", row.offload_param))
        if device != "none"
    ]
    if not offloaded:
        return f"ZeRO-{row.stage}"
    return f"ZeRO-{row.stage} with {' and '.join(offloaded)}"


def _capitalized(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _check_sizes(total_params: int, largest_layer_params: int, gpus_per_node: int, num_nodes: int) -> None:
    if total_params < 0 or largest_layer_params < 0:
        raise ValueError(
            f"parameter counts must not be negative (total {total_params}, largest layer "
            f"{largest_layer_params}); pass the counts from count_params(model)"
        )
    if largest_layer_params > total_params:
        raise ValueError(
            f"the largest layer ({largest_layer_params}) cannot hold more parameters than the "
            f"model ({total_params}); pass the counts from count_params(model)"
        )
    if gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(
            f"gpus_per_node and num_nodes must be at least 1 (got {gpus_per_node} and "
            f"{num_nodes}); pass 1 for a single device"
        )


def _check_setup(stage: int | None, offload_optimizer: str, offload_param: str) -> None:
    if stage not in STAGES:
        raise ValueError(
            f"ZeRO stage must be None, 0, 1, 2 or 3, got {stage!r}; pass stage=None to train without DeepSpeed"
        )
    for name, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"{name} must be one of {', '.join(OFFLOAD_DEVICES)}, got {device!r}")
    if offload_optimizer != "none" and (stage is None or stage == 0):
        raise ValueError(
            f"optimizer offload needs ZeRO stage 1, 2 or 3 (stage is {stage}); pass stage=2 or drop the offload"
        )
    if offload_param != "none" and stage != 3:
        raise ValueError(
            f"parameter offload needs ZeRO stage 3 (stage is {stage}); pass stage=3 or drop parameter offload"
        )


# --- planned against measured --------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredMemory:
    """One rank's memory in a run: what the plan counted per device and the most it was seen using.

    Measured is the allocator's peak on a GPU (``max_memory_allocated``); on a CPU the resident
    memory of the process, sampled at step ends (at most twice a second and at the last step),
    which misses a peak between two samples. Planned is the plan's model states, framework and
    activations at the micro-batch (`nexa_nb.plan.Plan.planned_device_bytes`), None when the
    task's first step could not be traced.
    """

    rank: int
    planned_bytes: int | None
    measured_bytes: int

    @property
    def ratio(self) -> float | None:
        """measured / planned: above 1, the run used more than planned."""
        return self.measured_bytes / self.planned_bytes if self.planned_bytes else None


class MeasuredTally(Sink):
    """Each rank's largest memory figure from its `StepEnd` events, against the plan's figure
    that `RunStarted` carries; a run that starts again (an out-of-memory retry) starts it again."""

    def __init__(self) -> None:
        self.planned: int | None = None
        self.measured: dict[int, int] = {}

    def on_run_started(self, event: RunStarted) -> None:
        self.planned, self.measured = event.plan_summary.get("planned_memory"), {}

    def on_step_end(self, event: StepEnd) -> None:
        used = event.memory.peak if event.memory.capacity else event.memory.host_rss
        self.measured[event.rank] = max(used, self.measured.get(event.rank, 0))

    def per_rank(self) -> list[MeasuredMemory]:
        return [MeasuredMemory(rank, self.planned, self.measured[rank]) for rank in sorted(self.measured)]

    def line(self) -> str | None:
        """ "memory: planned 1.20 GiB, measured 0.98 GiB per process (ratio 0.82)", the measured
        figure being the largest rank's; None before the first step, or without a planned figure."""
        ranks = self.per_rank()
        if not ranks or self.planned is None:
            return None
        top = max(ranks, key=lambda m: m.measured_bytes)
        return (
            f"memory: planned {format_bytes(top.planned_bytes)}, measured {format_bytes(top.measured_bytes)} "
            f"per process (ratio {top.ratio:.2f})"
        )


def measured_memory(events) -> list[MeasuredMemory]:
    """Planned and measured memory of each rank of a run, from its events (a run record's, say)."""
    tally = MeasuredTally()
    for event in events:
        tally.handle(event)
    return tally.per_rank()
