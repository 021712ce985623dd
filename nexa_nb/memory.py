"""How much memory the model states take, and which ZeRO setup fits the memory at hand.

"Model states" are parameters, gradients and optimizer state, the part of training memory
that ZeRO partitions and offloads.  The numbers are DeepSpeed's own estimates
(``estimate_zero2_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage_1_and_2.py`` and
``estimate_zero3_model_states_mem_needs`` in ``deepspeed/runtime/zero/stage3.py``), redone
here with the same arithmetic so that this module imports neither torch nor DeepSpeed.
As in DeepSpeed, device bytes are per device and host bytes are per node.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexa_nb.config import OFFLOAD_DEVICES
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
) -> StateMemory:
    """Model-state bytes per device and per node's host for one ZeRO setup.

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

    total_gpus = gpus_per_node * num_nodes
    host_fp32_copies = total_params * _FP32 * gpus_per_node * additional_buffer_factor
    if stage is None:
        device = _PLAIN_FP32_ADAMW * total_params
        host = host_fp32_copies
    elif stage == 0:
        device = _FP16_PARAMS * total_params + _ZERO2_PARTITIONED * total_params
        host = host_fp32_copies
    elif stage in (1, 2):
        if offload_optimizer != "none":
            device = _FP16_PARAMS * total_params
            # DeepSpeed counts the GPUs of all nodes here, not of one node; kept to stay equal to it.
            host = total_params * max(_FP32 * total_gpus, _ZERO2_OFFLOAD_MIN) * additional_buffer_factor
        else:
            device = _FP16_PARAMS * total_params + int(_ZERO2_PARTITIONED * total_params / total_gpus)
            host = host_fp32_copies
    else:
        on_device = (_FP16_PARAMS if offload_param == "none" else 0) + (
            _ZERO3_OPTIMIZER if offload_optimizer == "none" else 0
        )
        device = _FP32 * largest_layer_params + int(on_device * total_params / total_gpus)
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
    total_params: int, largest_layer_params: int, *, gpus_per_node: int = 1, num_nodes: int = 1
) -> list[StateMemory]:
    """One row per setup worth comparing, from plain Accelerate to ZeRO-3 with full cpu offload."""
    return _rows(total_params, largest_layer_params, _TABLE_SETUPS, gpus_per_node, num_nodes)


def _rows(total_params: int, largest_layer_params: int, setups, gpus_per_node: int, num_nodes: int) -> list:
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
        )
        for stage, opt, param in setups
    ]


@dataclass(frozen=True)
class Recommendation:
    """The setup to train with.  ``device_bytes`` is model states plus, when their size was
    given, activations at ``micro_batch``, per device."""

    stage: int | None
    offload_optimizer: str
    offload_param: str
    micro_batch: int | None
    device_bytes: int
    reason: str


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


def _check_budget(
    device_bytes_available: int,
    host_bytes_available: int,
    headroom: float,
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
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}; pass 0.9 to keep 10% spare")
    if wanted_micro_batch < 1:
        raise ValueError(f"wanted_micro_batch must be at least 1, got {wanted_micro_batch}")
    if activation_bytes_per_sample is not None and activation_bytes_per_sample < 0:
        raise ValueError(
            f"activation_bytes_per_sample must not be negative, got {activation_bytes_per_sample}; "
            "pass None when it is not known"
        )


def _needs(row: StateMemory, activation_bytes_per_sample: int | None, micro_batch: int) -> str:
    return (
        f"{format_bytes(row.device_bytes)} of model states"
        f"{_activations(activation_bytes_per_sample, micro_batch)} per device and "
        f"{format_bytes(row.host_bytes)} of host memory"
    )


def recommend(
    total_params: int,
    largest_layer_params: int,
    *,
    device_bytes_available: int,
    host_bytes_available: int,
    gpus_per_node: int = 1,
    num_nodes: int = 1,
    activation_bytes_per_sample: int | None = None,
    wanted_micro_batch: int = 8,  # a common micro-batch for fine-tuning; the caller's choice wins
    headroom: float = 0.9,  # leave 10% of each device to the CUDA context, allocator slack and buffers
) -> Recommendation:
    """The fastest setup whose model states (and activations) fit, and its micro-batch.

    Setups are tried fastest first: plain Accelerate, ZeRO-2, ZeRO-2 with cpu optimizer
    offload, ZeRO-3, ZeRO-3 with cpu optimizer offload, ZeRO-3 with cpu optimizer and
    parameter offload.  On one device ZeRO shards nothing, so its stages without offload
    need more than plain Accelerate and never win; offload is the only lever there.  On
    several devices the lower stages communicate less: ZeRO-2 moves as much as DDP, ZeRO-3
    gathers every parameter in forward and backward on top, which (as the Transformers
    DeepSpeed guide ranks them) costs more than offloading ZeRO-2's optimizer step.

    A setup fits when model states plus activations at the micro-batch stay within
    ``headroom * device_bytes_available`` per device and its host bytes within
    ``host_bytes_available`` (per node).  With ``activation_bytes_per_sample`` known, the
    micro-batch is the largest of ``wanted_micro_batch`` and the powers of two below it that
    fits; a faster setup with a smaller micro-batch beats a slower one, since gradient
    accumulation restores the effective batch for less than offload costs.  Without it,
    the micro-batch is the wanted one, unchecked.  When nothing fits, the setup needing the
    least device memory is returned (host memory can be stretched with NVMe offload, device
    memory cannot), with a reason that says by how much it misses.
    """
    _check_sizes(total_params, largest_layer_params, gpus_per_node, num_nodes)
    _check_budget(
        device_bytes_available, host_bytes_available, headroom, wanted_micro_batch, activation_bytes_per_sample
    )

    budget = int(headroom * device_bytes_available)
    usable = f"{format_bytes(budget)} usable ({headroom:.0%} of {format_bytes(device_bytes_available)})"
    host_available = format_bytes(host_bytes_available)
    rows = _rows(total_params, largest_layer_params, _SPEED_ORDER, gpus_per_node, num_nodes)

    def needs(row: StateMemory, micro_batch: int) -> str:
        return _needs(row, activation_bytes_per_sample, micro_batch)

    for i, row in enumerate(rows):
        micro_batch = _fitting_micro_batch(row.device_bytes, budget, activation_bytes_per_sample, wanted_micro_batch)
        if micro_batch is None or row.host_bytes > host_bytes_available:
            continue
        reason = (
            f"{_label(row)} fits: it needs {needs(row, micro_batch)}, within {usable} per device "
            f"and {host_available} of host memory"
        )
        if i > 0:
            reason += f"; the faster {_label(rows[i - 1])} would need {needs(rows[i - 1], 1)}"
        reason += "."
        if activation_bytes_per_sample is None:
            reason += (
                f" Activations were not estimated, so micro-batch {micro_batch} is unchecked; "
                "pass activation_bytes_per_sample to size it."
            )
        device_need = row.device_bytes + (activation_bytes_per_sample or 0) * micro_batch
        return Recommendation(
            row.stage, row.offload_optimizer, row.offload_param, micro_batch, device_need, _capitalized(reason)
        )

    micro_batch = wanted_micro_batch if activation_bytes_per_sample is None else 1
    frugal = min(rows, key=lambda row: row.device_bytes)
    device_need = frugal.device_bytes + (activation_bytes_per_sample or 0) * micro_batch
    misses, fixes = [], []
    if device_need > budget:
        misses.append(f"{format_bytes(device_need - budget)} more per device than the {usable}")
        fixes.append("add devices or nodes, or train a smaller model or LoRA adapters")
    if frugal.host_bytes > host_bytes_available:
        misses.append(
            f"{format_bytes(frugal.host_bytes - host_bytes_available)} more host memory than the "
            f"{host_available} available"
        )
        fixes.append("offload to NVMe with ZeRO-3 to keep that state out of host memory")
    reason = (
        f"Nothing fits, and this will not fit either: {_label(frugal)}, the setup needing the least "
        f"device memory, needs {needs(frugal, micro_batch)}, which is {' and '.join(misses)}. "
        f"{_capitalized('; '.join(fixes))}."
    )
    return Recommendation(
        frugal.stage, frugal.offload_optimizer, frugal.offload_param, micro_batch, device_need, reason
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


def _activations(per_sample: int | None, micro_batch: int) -> str:
    if per_sample is None:
        return ""
    return f" + {format_bytes(per_sample * micro_batch)} of activations at micro-batch {micro_batch}"


def _fitting_micro_batch(states: int, budget: int, per_sample: int | None, wanted: int) -> int | None:
    """The largest of ``wanted`` and the powers of two below it that fits, or None if not even 1 does."""
    if per_sample is None:
        return wanted if states <= budget else None
    candidates = [wanted] + [2**k for k in range(wanted.bit_length() - 1, -1, -1) if 2**k < wanted]
    return next((mb for mb in candidates if states + per_sample * mb <= budget), None)


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
