"""Setting a run up: from (plan, task) to a `Runtime`, everything the loop trains with.

The Accelerator and the environment it reads, the model (with gradient checkpointing and
LoRA), the optimizer, the schedule and the data loaders, prepared by Accelerate; a streamed
train_data is read by `StreamBatches` instead.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nexa_nb.engine.batches import default_forward, map_tensors, placing_collate
from nexa_nb.errors import TrainingError
from nexa_nb.plan import Plan
from nexa_nb.schedules import SCHEDULES
from nexa_nb.task import Task
from nexa_nb.trackers import TRACKERS


@dataclass
class Runtime:
    """The prepared objects of one rank, and the run's length."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    """A prepared DataLoader over map-style data, or the `StreamBatches` of a stream."""
    eval_loader: Any | None
    forward: Callable
    cast_dtype: torch.dtype | None
    """The model's half-precision dtype under DeepSpeed, whose engines do not autocast inputs; else None."""
    steps_per_epoch: int | None
    """None for a stream, whose length is unknown."""
    total_steps: int
    trainable: list[torch.nn.Parameter]
    fingerprint: dict[str, Any]
    distributed_type: str


def setup(plan: Plan, task: Task) -> Runtime:
    """Build and prepare everything for `plan`; the seed is set before the model is built."""
    from accelerate.utils import set_seed

    c = plan.config
    apply_worker_environment(plan)
    accelerator = build_accelerator(plan)
    set_seed(c.seed)
    model = build_model(task, plan)
    fingerprint = model_fingerprint(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("the model has no trainable parameter (all requires_grad=False)")
    wrap_first = plan.distributed_type == "FSDP"
    if wrap_first:
        # FSDP flattens the parameters when it wraps the model: an optimizer made before would
        # hold the old ones and never change the model. Wrap first, as Accelerate advises.
        model = accelerator.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, plan)
    loader, eval_loader = make_loaders(task, plan)
    per_epoch, total_steps = run_length(task.train_data, plan)
    scheduler = make_scheduler(optimizer, plan, total_steps)

    loaders = [] if per_epoch is None else [loader]  # a stream is read by StreamBatches, not by a prepared loader
    if wrap_first:
        optimizer, *loaders, scheduler = accelerator.prepare(optimizer, *loaders, scheduler)
    else:
        model, optimizer, *loaders, scheduler = accelerator.prepare(model, optimizer, *loaders, scheduler)
    loader = loaders[0] if loaders else loader
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cast_dtype = model_dtype if plan.uses_deepspeed and model_dtype in (torch.bfloat16, torch.float16) else None
    return Runtime(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=loader,
        eval_loader=eval_loader,
        forward=task.forward or default_forward,
        cast_dtype=cast_dtype,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        trainable=trainable,
        fingerprint=fingerprint,
        distributed_type=accelerator.distributed_type.value,
    )


def is_stream(data) -> bool:
    """A torch ``IterableDataset`` (Hugging Face's ``datasets.IterableDataset`` is one): read in order, no length."""
    return isinstance(data, torch.utils.data.IterableDataset)


def run_length(data, plan: Plan) -> tuple[int | None, int]:
    """(optimizer steps per epoch, steps in the run); a stream has no epoch length, so it needs max_steps."""
    c = plan.config
    if is_stream(data):
        if c.max_steps is None:
            raise TrainingError(
                f"train_data is a stream ({type(data).__name__}) whose length is unknown, so the run needs a "
                "length: pass --max-steps N (max_steps=N); the stream starts again from its beginning whenever "
                "it ends before"
            )
        return None, c.max_steps
    per_epoch = steps_per_epoch(len(data), plan)
    return per_epoch, c.max_steps or per_epoch * c.epochs


def steps_per_epoch(samples: int, plan: Plan) -> int:
    """Optimizer steps in one pass over `samples` (incomplete batches dropped); at least one, or an error."""
    steps = samples // plan.effective_batch
    if steps < 1:
        raise TrainingError(
            f"one optimizer step needs {plan.effective_batch} samples (micro-batch {plan.micro_batch} x accumulation "
            f"{plan.grad_accum} x {plan.procs} procs) but train_data has {samples}; lower --batch-size, "
            "--grad-accum or --procs"
        )
    return steps


def apply_worker_environment(plan: Plan) -> None:
    """The plan's variables, and none of those a launcher derived from another config.

    ``accelerate launch`` turns a YAML's ``deepspeed_config`` / ``fsdp_config`` into
    ``ACCELERATE_DEEPSPEED_*``, ``ACCELERATE_GRADIENT_*`` and ``FSDP_*`` variables;
    Accelerate then refuses them next to the plan's complete DeepSpeed config, or lets them
    silently override the plan's accumulation.
    """
    launcher_overrides = ("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_", "FSDP_")
    for name in [n for n in os.environ if n.startswith(launcher_overrides)]:
        del os.environ[name]
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    os.environ.update(plan.worker_env)
    for tracker in plan.config.trackers:
        TRACKERS[tracker].prepare(plan.accelerator_kwargs["project_dir"])


def build_accelerator(plan: Plan):
    """The Accelerator for this plan, checked against what the plan expects.

    On a CPU-only host, DeepSpeed needs Accelerate to use gloo without ``cpu=True``:
    ``cpu=True`` silently drops the DeepSpeed plugin, and without a backend Accelerate
    believes it runs one process while DeepSpeed sees the whole world (its
    ``train_batch_size`` check then fails).  Passing the backend explicitly fixes both.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    kwargs = dict(plan.accelerator_kwargs)
    handlers = []
    if plan.deepspeed_config is not None:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(plan.deepspeed_config))
        if plan.device == "cpu":
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if plan.config.find_unused_parameters and plan.deepspeed_config is None:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if "project_dir" in kwargs:
        kwargs["project_config"] = ProjectConfiguration(project_dir=kwargs.pop("project_dir"))
    accelerator = Accelerator(
        **kwargs,
        kwargs_handlers=handlers,
        # On a GPU, batches go to the device by non-blocking copies (from pinned memory: the loaders
        # pin them): a blocking copy waits for everything the device has queued, at every batch.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=plan.config.seed, non_blocking=plan.device == "cuda"
        ),
        step_scheduler_with_optimizer=False,
    )
    reported = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if reported != plan.distributed_type or accelerator.num_processes != plan.procs:
        raise RuntimeError(
            f"Accelerate set up {reported} with {accelerator.num_processes} process(es), but the plan is "
            f"{plan.distributed_type} with {plan.procs}: refusing to train unsynchronised copies"
        )
    return accelerator


def build_model(task: Task, plan: Plan) -> torch.nn.Module:
    """The task's model, with gradient checkpointing and LoRA adapters when the plan asks for them."""
    model = task.build_model()
    if plan.config.grad_ckpt:
        enable_gradient_checkpointing(model)
    if plan.config.lora:
        model = apply_lora(model, plan)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> str:
    """Transformers models use their own switch; any other module checkpoints each child.

    transformers 5 renamed the switch ``activation_checkpointing_enable`` and warns, on every
    rank, when the old name is called; the old name serves older releases.
    """
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return "transformers"
    if hasattr(model, "gradient_checkpointing_enable") and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
        return "transformers"
    from torch.utils.checkpoint import checkpoint

    def checkpointed(forward, *args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    wrapped = 0
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            # Patching the instance's forward keeps parameter names (and checkpoints) unchanged.
            child.forward = functools.partial(checkpointed, child.forward)
            wrapped += 1
    if wrapped == 0:
        raise TrainingError(
            "gradient checkpointing found no sub-module to checkpoint; "
            "drop --grad-ckpt or split the model into child modules"
        )
    return f"{wrapped} child modules"


def apply_lora(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The model with LoRA adapters (peft), told what peft would otherwise guess and warn about.

    GPT-2-style models keep their projections in transformers' ``Conv1D``, whose weight is
    stored (in, out): peft needs ``fan_in_fan_out=True`` for them, and warns on every rank
    when it has to set it itself.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    c = plan.config
    targets = list(c.lora_target_modules) if c.lora_target_modules else None
    task_type = None
    cls = type(model).__name__
    kinds = (
        ("ForTokenClassification", TaskType.TOKEN_CLS),
        ("ForSequenceClassification", TaskType.SEQ_CLS),
        ("ForCausalLM", TaskType.CAUSAL_LM),
        ("LMHeadModel", TaskType.CAUSAL_LM),
        ("ForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM),
    )
    for suffix, kind in kinds:
        if cls.endswith(suffix):
            task_type = kind
    if targets is None and not hasattr(model, "config"):
        # A plain module: adapt every linear layer.
        targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        if not targets:
            raise TrainingError("--lora found no nn.Linear layer to adapt; pass lora_target_modules=[...]")
    config = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
    )
    return get_peft_model(model, config)


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Names and shapes of every parameter: enough to tell another model's checkpoint apart."""
    shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "digest": hashlib.sha256(shapes.encode()).hexdigest()[:16],
    }


def make_optimizer(params, plan: Plan):
    c = plan.config
    if plan.uses_deepspeed and c.offload_optimizer != "none":
        # ZeRO-Offload steps on the host: DeepSpeed insists on its own CPU Adam there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=plan.lr, weight_decay=c.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=c.weight_decay)


def make_scheduler(optimizer, plan: Plan, total_steps: int):
    """The config's schedule (see `nexa_nb.schedules`) as a LambdaLR over `total_steps`."""
    factor, warmup = SCHEDULES[plan.config.scheduler], plan.config.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, warmup, total_steps))


def make_loaders(task: Task, plan: Plan):
    """The train loader (shuffled, incomplete batches dropped) and the eval loader, or None.

    A streamed train_data gets its `StreamBatches` instead: in order, no sample dropped.

    Each loader draws from a generator of its own, never from the global RNG that dropout uses:
    a DataLoader takes a seed from its generator at every new iterator, and a resumed run
    creates one where the uninterrupted run did not, so drawing from the global RNG would
    shift every dropout mask after a resume. The order itself comes from Accelerate's
    seedable sampler: a function of (seed, epoch). Accelerate moves each batch to this rank's
    device, except a dataclass batch: the collate step places that one itself.
    """
    from accelerate import PartialState
    from torch.utils.data import DataLoader, default_collate

    seed = plan.config.seed
    device = PartialState().device
    collate = placing_collate(task.collate_fn or default_collate, device)
    if is_stream(task.train_data):
        loader = StreamBatches(task.train_data, plan.micro_batch, task.collate_fn or default_collate, device)
    else:
        loader = DataLoader(
            task.train_data,
            batch_size=plan.micro_batch,
            shuffle=True,
            collate_fn=collate,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=plan.device == "cuda",
        )
    eval_loader = None
    if task.eval_data is not None:
        eval_loader = DataLoader(
            task.eval_data,
            batch_size=plan.micro_batch,
            shuffle=False,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )
    return loader, eval_loader


class StreamBatches:
    """A streamed train_data as this rank's micro-batches, each sample read once, by rank 0.

    Rank 0 reads micro-batch x processes samples at a time and scatters one micro-batch of
    samples to each rank, which collates its own: so batches may differ in shape from rank to
    rank (padding collators; Accelerate's dispatcher for iterable datasets concatenates collated
    batches, which refuses those), and every rank learns where the stream stands. A stream that
    ends is read again from its beginning (the next pass) without dropping its last samples:
    a micro-batch may span two passes, and every optimizer step takes the same number of
    samples. Nothing is shuffled: the order is the stream's own.

    A position is (pass, samples read in that pass). A resume reads the checkpoint's pass again
    and skips that many samples: exact when the stream yields the same samples in the same
    order each time it is iterated.
    """

    def __init__(self, source, micro_batch: int, collate: Callable, device):
        self.source, self.micro_batch, self.collate, self.device = source, micro_batch, collate, device

    def batches(self, position: tuple[int, int]) -> Iterator[tuple[tuple[int, int], Any]]:
        """(position after it, this rank's micro-batch) from `position` on, without end.

        Every rank must take the same number of batches: each one is a collective call.
        """
        import torch.distributed as dist
        from accelerate import PartialState

        state = PartialState()
        rank, world, size = state.process_index, state.num_processes, self.micro_batch
        samples = self._read(*position) if rank == 0 else None
        while True:
            shares = None
            if rank == 0:
                read = list(itertools.islice(samples, size * world))
                where = read[-1][0]
                shares = [(where, [sample for _, sample in read[r * size : (r + 1) * size]]) for r in range(world)]
            mine = [None]
            if world > 1:
                dist.scatter_object_list(mine, shares, src=0)
            else:
                mine = shares
            where, share = mine[0]
            yield where, map_tensors(lambda t: t.to(self.device, non_blocking=True), self.collate(share))

    def _read(self, start_pass: int, skip: int) -> Iterator[tuple[tuple[int, int], Any]]:
        """((pass, samples read in it), sample) for every sample after the first `skip`, pass after pass."""
        epoch = start_pass
        while True:
            read = 0
            for sample in self.source:
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield (epoch, read), sample
            if read == 0:
                raise TrainingError(
                    f"train_data yielded no sample in pass {epoch}; its __iter__ must start the stream afresh "
                    "at every call"
                )
            epoch += 1
