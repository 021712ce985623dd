"""The trained model on disk: written by the workers when a run completes, read back in the kernel.

The final weights never travel through the queue: the kernel, the one process that must stay
small, would hold a whole copy of them. Rank 0 writes them into the plan's ``output_dir`` in
the model's own format instead, and whoever wants them loads that folder:

* a transformers model: its ``save_pretrained`` folder (config and sharded safetensors), which
  its class's ``from_pretrained`` loads;
* any other module: ``model.safetensors``, loaded into a model from the task's factory;
* LoRA: peft's adapter folder, which ``PeftModel.from_pretrained`` loads over the task's base
  model; with ``merge_lora``, also the merged model in ``merged/``.

Every folder holds `FORMAT_FILE`, saying which of these it is. Under ZeRO-3 (and FSDP) every
rank takes part in gathering the weights, through Accelerate, and rank 0 writes them. The folder
is written beside its place and renamed into it: an interrupted save leaves the previous folder
or none, never half of one.

No torch import at the top: the kernel checks an output folder before any worker starts.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nexa_nb.plan import Plan
    from nexa_nb.task import Task

FORMAT_FILE = "nexa_model.json"
"""What a model folder holds: {"format": "transformers" | "safetensors" | "peft", ...}."""
MERGED = "merged"
"""The sub-folder of a LoRA run's output that holds the merged model (with merge_lora)."""
WEIGHTS_FILE = "model.safetensors"


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder this module wrote, which a new run may replace."""
    return (Path(path) / FORMAT_FILE).is_file()


def save_final_model(accelerator, model, plan: Plan, task: Task) -> str:
    """Write the prepared `model`'s final weights into ``plan.output_dir``; every rank calls this.

    Sharded weights (ZeRO-3, FSDP) are gathered by Accelerate, which needs every rank; whole
    weights are read on rank 0 alone, so no other rank copies the model.
    """
    sharded = plan.config.zero == 3 or plan.config.fsdp
    state = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        final = Path(plan.output_dir)
        tmp = final.parent / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_model(unwrapped, unwrapped.state_dict() if state is None else state, tmp, plan, task)
        _move_into_place(tmp, final)
    accelerator.wait_for_everyone()
    return str(plan.output_dir)


def write_model(module, state: dict, folder: Path, plan: Plan, task: Task) -> None:
    """`module` with the weights `state` into the empty `folder`, in its own format."""
    if plan.config.lora:
        # peft keeps only the adapter's entries of the whole state dict it is given.
        module.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
        _save_tokenizer(task.tokenizer, folder)
        # The seed rebuilds the base weights an adapter was trained on, when a factory draws them at random.
        _write_format(folder, {"format": "peft", "merged": plan.config.merge_lora, "seed": plan.config.seed})
        if plan.config.merge_lora:
            merged = _merged(module, state, plan, task)
            (folder / MERGED).mkdir()
            _write_whole(merged, merged.state_dict(), folder / MERGED, task.tokenizer)
        return
    _write_whole(module, state, folder, task.tokenizer)


def _write_whole(module, state: dict, folder: Path, tokenizer) -> None:
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one of its
    if transformers is not None and isinstance(module, transformers.PreTrainedModel):
        # transformers 5 writes safetensors only, sharded above max_shard_size.
        module.save_pretrained(str(folder), state_dict=state)
        info: dict[str, Any] = {"format": "transformers"}
    else:
        info = {"format": "safetensors", "tied": _save_safetensors(state, folder / WEIGHTS_FILE)}
    info["class"] = [type(module).__module__, type(module).__qualname__]
    _save_tokenizer(tokenizer, folder)
    _write_format(folder, info)


def _save_safetensors(state: dict, path: Path) -> dict[str, str]:
    """Write `state` with safetensors, which refuses tensors sharing memory: a tensor that is
    another one (tied weights) is written once, and the returned {name: written name} restores it."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in seen:
            tied[name] = seen[view]
            continue
        seen[view] = name
        shares = tensor.numel() and ptr in storages
        storages.add(ptr)
        tensors[name] = tensor.clone() if shares else tensor.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tied


def _merged(peft_model, state: dict, plan: Plan, task: Task):
    """The base model with the adapters merged in, on the CPU, in the dtype the run trained.

    Sharded weights exist whole only in `state`: they are loaded into a model from the task's
    factory (the kernel refuses merge_lora with ZeRO-3 and a model instance).
    """
    import torch

    from nexa_nb.engine.runtime import apply_lora

    skeleton = apply_lora(task.build_model(), plan) if task.model_is_factory() else copy.deepcopy(peft_model)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    skeleton = skeleton.cpu().to(dtype)
    skeleton.load_state_dict(state)
    return skeleton.merge_and_unload()


def _save_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _write_format(folder: Path, info: dict[str, Any]) -> None:
    (folder / FORMAT_FILE).write_text(json.dumps(info, indent=1))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, replacing an earlier run's folder there."""
    old = final.parent / f".old-{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- reading it back -------------------------------------------------------------------------


def load_model(model_dir: str | os.PathLike, task: Task, *, merge: bool = True):
    """The model in `model_dir`, built as the task builds it (on the CPU).

    A LoRA folder gives the base model with the adapters merged in, or with `merge` False the
    ``PeftModel`` itself.
    """
    folder = Path(model_dir)
    info = _read_format(folder)
    if info["format"] != "peft":
        return _load_whole(folder, info, task)
    if merge and info.get("merged"):
        return _load_whole(folder / MERGED, _read_format(folder / MERGED), task)
    from peft import PeftModel

    model = PeftModel.from_pretrained(_fresh_model(task, info.get("seed")), str(folder))
    return model.merge_and_unload() if merge else model


def _load_whole(folder: Path, info: dict[str, Any], task: Task):
    if info["format"] == "transformers":
        cls = type(task.model) if not task.model_is_factory() else _import_class(*info["class"])
        with _without_progress_bar():
            return cls.from_pretrained(str(folder))
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_FILE))
    state.update({name: state[written] for name, written in info.get("tied", {}).items()})
    model = _fresh_model(task)
    model.load_state_dict(state)
    return model


@contextmanager
def _without_progress_bar():
    """transformers draws a "Loading weights" bar for a folder the user never asked to load."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def _fresh_model(task: Task, seed: int | None = None):
    """A model from the task's factory, or a copy of its module (never the task's own).

    With `seed`, the factory draws what it draws at random as the workers did (they seed before
    building), and the kernel's random state is left as it was.
    """
    if not task.model_is_factory():
        return copy.deepcopy(task.model)
    if seed is None:
        return task.build_model()
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return task.build_model()
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _import_class(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _read_format(folder: Path) -> dict[str, Any]:
    from nexa_nb.errors import TrainingError

    try:
        return json.loads((folder / FORMAT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(
            f"{folder} is not a model folder written by nexa_nb ({type(exc).__name__}: {exc}); "
            "pass the output_dir of a completed run"
        ) from None
