"""Every bad input a user can give, through the magic they would type it into.

Each must give one line that names the problem and the fix: no traceback, no worker
started, no file written, no result replaced. The catalogue is also the bad-input part
of docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError

import nexa_nb
from tests.test_magics import linear_data, linear_task, mse, nexa  # noqa: F401  (fixtures)


class Unindexable:
    def __iter__(self):
        yield from linear_data()


def prepare_inputs(folder: Path) -> dict:
    """Files and notebook variables the catalogue refers to."""
    (folder / "afile").write_text("")
    (folder / "adir").mkdir()
    (folder / "notes.txt").write_text("mixed_precision: bf16\n")
    (folder / "broken.yaml").write_text("mixed_precision: [bf16\n")
    (folder / "unknown.yaml").write_text("mixed_precision: bf16\nmixed_precison: fp16\n")
    (folder / "wrongtype.yaml").write_text("num_processes: two\n")
    (folder / "list.yaml").write_text("- a\n- b\n")
    (folder / "unreadable.yaml").write_bytes(b"\xff\xfe\x00not text")
    (folder / "broken.json").write_text('{"zero_optimization": {"stage": 2},}')
    (folder / "unknown.json").write_text('{"zero_optimisation": {"stage": 2}}')
    (folder / "wrongtype.json").write_text('{"train_micro_batch_size_per_gpu": "eight"}')
    (folder / "stage9.json").write_text('{"zero_optimization": {"stage": 9}}')
    (folder / "empty_ckpt").mkdir()
    step = folder / "zero2_ckpt" / "step-0000004"
    step.mkdir(parents=True)
    (step / "nexa_state.json").write_text(json.dumps({"step": 4, "zero": 2, "procs": 1}))
    torn = folder / "torn_ckpt" / "step-0000002"
    torn.mkdir(parents=True)
    (torn / "nexa_state.json").write_text("{not json")

    def no_loss_model():
        return torch.nn.Linear(4, 1)

    def loss_not_scalar(outputs, batch):
        return (outputs - batch[-1]) ** 2

    def collate_to_string(samples):
        return "a batch"

    def wrong_shape_model():
        return torch.nn.Linear(7, 1)

    class Classifier(torch.nn.Module):  # built from a factory: only on fake tensors in the kernel
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    def cross_entropy(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch["labels"])

    def by_ids(model, batch):
        return model(batch["ids"])

    def rows(label, key="ids"):
        return [{key: torch.randint(0, 100, (12,)), "labels": label} for _ in range(64)]

    return {
        "not_a_task": "a string",
        "bad_model_task": nexa_nb.Task(42, linear_data(), loss_fn=mse),
        "empty_task": linear_task(data=[]),
        "iterable_task": linear_task(data=Unindexable()),
        "strings_task": linear_task(data=["a sample"] * 64),
        "small_task": linear_task(data=linear_data(8)),
        "no_loss_task": nexa_nb.Task(no_loss_model(), linear_data()),
        "vector_loss_task": nexa_nb.Task(no_loss_model(), linear_data(), loss_fn=loss_not_scalar),
        "string_collate_task": nexa_nb.Task(no_loss_model(), linear_data(), loss_fn=mse, collate_fn=collate_to_string),
        "wrong_shape_task": nexa_nb.Task(wrong_shape_model(), linear_data(), loss_fn=mse),
        "empty_eval_task": nexa_nb.Task(no_loss_model(), linear_data(), eval_data=[], loss_fn=mse),
        "argument_names_task": nexa_nb.Task(Classifier, rows(torch.tensor(1), "input_ids"), loss_fn=cross_entropy),
        "float_labels_task": nexa_nb.Task(Classifier, rows(torch.tensor(1.0)), loss_fn=cross_entropy, forward=by_ids),
        "int32_labels_task": nexa_nb.Task(
            Classifier, rows(torch.tensor(1, dtype=torch.int32)), loss_fn=cross_entropy, forward=by_ids
        ),
        "padded_lists_task": nexa_nb.Task(
            Classifier, [{"ids": [5, 6, 7, 0, 0], "labels": 1}] * 64, loss_fn=cross_entropy, forward=by_ids
        ),
    }


# (what the user types after %nexa_train, words the message must contain)
CATALOGUE = [
    # flags and values
    ("--zer 3", "unrecognized arguments: --zer. Fix: did you mean --zero?"),
    ("--zero 7", "argument --zero: '7' is not a ZeRO stage; use 0, 1, 2, 3 or none"),
    ("--zero three", "argument --zero: 'three' is not a ZeRO stage"),
    ("--procs 0", "procs: must be at least 1"),
    ("--procs -2", "procs: must be at least 1"),
    ("--procs 64", "would thrash"),
    ("--lr abc", "invalid float value: 'abc'"),
    ("--lr -0.1", "lr: must be positive"),
    ("--batch-size 0", "batch_size: must be at least 1"),
    ("--grad-accum 0", "grad_accum: must be at least 1"),
    ("--max-steps 0", "max_steps: must be at least 1"),
    ("--epochs 0", "epochs: must be at least 1"),
    ("--seed -1", "seed: must be >= 0"),
    ("--lora --lora-r 0", "lora_r: must be at least 1"),
    ("--ckpt-every 0 --ckpt-dir ck", "ckpt_every: must be at least 1"),
    ("--ckpt-dir 'unclosed", "No closing quotation"),
    # combinations
    ("--fp16 --bf16", "not allowed with argument --fp16"),
    ("--fp16 --strict", "fp16 needs a CUDA GPU"),
    ("--grad-accum 2 --target-batch 64", "contradicts --target-batch 64"),
    ("--batch-size 8 --target-batch 30", "30 is not a multiple of batch_size x processes"),
    ("--offload cpu", "optimizer offload needs ZeRO stage 1, 2 or 3"),
    ("--zero 0 --offload cpu", "optimizer offload needs ZeRO stage 1, 2 or 3"),
    ("--zero 2 --offload-param cpu", "parameter offload needs ZeRO stage 3"),
    ("--zero 3 --offload nvme", "NVMe offload needs a folder"),
    ("--zero 3 --offload nvme --nvme-path nowhere", "'nowhere' is not an existing folder"),
    ("--ckpt-every 5", "a checkpoint interval needs a folder"),
    ("--resume latest", "resume='latest' needs a checkpoint folder"),
    # paths
    ("--ckpt-dir afile", "'afile' is a file, not a folder"),
    ("--ckpt-dir afile/ckpt", "'afile/ckpt' cannot be written"),
    ("--resume nowhere", "checkpoint 'nowhere' does not exist"),
    ("--resume latest --ckpt-dir empty_ckpt", "found no complete checkpoint in empty_ckpt"),
    ("--resume zero2_ckpt/step-0000004", "written with ZeRO stage 2, this run uses None"),
    ("--resume torn_ckpt/step-0000002", "is corrupt"),
    ("--resume adir", "not a complete nexa_nb checkpoint"),
    # config files
    ("--config missing.yaml", "'missing.yaml' does not exist"),
    ("--config adir", "'adir' is a folder"),
    ("--config notes.txt", "neither .yaml/.yml (accelerate) nor .json (DeepSpeed)"),
    ("--config broken.yaml", "is not valid YAML"),
    ("--config unknown.yaml", "unknown key(s) mixed_precison"),
    ("--config wrongtype.yaml", "procs: expected a whole number, got 'two'"),
    ("--config list.yaml", "holds a list, not a mapping"),
    ("--config unreadable.yaml", "cannot read accelerate config file"),
    ("--config broken.json", "is not valid JSON"),
    ("--config unknown.json", "unknown DeepSpeed key(s) zero_optimisation"),
    ("--config wrongtype.json", "train_micro_batch_size_per_gpu must be a number"),
    ("--config stage9.json", "ZeRO stage must be 0, 1, 2 or 3"),
    # tasks, data and models
    ("missing_task", "there is no variable 'missing_task'"),
    ("not_a_task", "is a str, not a nexa_nb.Task"),
    ("bad_model_task", "Task.model must be a torch.nn.Module or a function returning one"),
    ("empty_task", "train_data is empty"),
    ("iterable_task", "train_data must be a map-style dataset"),
    ("strings_task", "a batch must be a tensor"),
    ("small_task --batch-size 16", "one optimizer step needs 16 samples"),
    ("small_task --procs 2 --batch-size 8", "one optimizer step needs 16 samples"),
    ("no_loss_task", "with no loss; pass Task(loss_fn=...)"),
    ("vector_loss_task", "the loss must be a scalar tensor"),
    ("string_collate_task", "a batch must be a tensor or a dict/tuple of tensors"),
    ("wrong_shape_task", "the model's forward failed on the first batch"),
    ("empty_eval_task", "eval_data is empty"),
    # mistakes a model factory makes, found on fake tensors before any process starts
    ("argument_names_task", "the model's forward takes no argument 'input_ids': it takes (ids)"),
    ("argument_names_task", "Task(forward=lambda model, batch: model(batch['input_ids']))"),
    ("float_labels_task", "takes class indices as torch.long (int64), but batch['labels'] holds Float"),
    ("int32_labels_task", "takes class indices as torch.long (int64), but batch['labels'] holds Int"),
    ("padded_lists_task", "batch['ids'] is a list of 5 tensors, not one tensor"),
    # the memory plan's shares
    ("--max-memory-usage 1.5", "max_memory_usage: must be in (0, 1], got 1.5"),
    ("--max-memory-usage 0", "max_memory_usage: must be in (0, 1], got 0"),
    ("--memory-safety-margin -0.1", "memory_safety_margin: must be in [0, 1), got -0.1"),
    ("--max-memory-usage 0.5 --memory-safety-margin 0.5", "leaves nothing of max_memory_usage 0.5"),
    # --batch-size auto and its budget
    ("--batch-size many", "argument --batch-size: 'many' is not a whole number; use a number such as 8, or auto"),
    ("--batch-size auto --grad-accum 2 --target-batch 64", "contradicts --target-batch 64 with --batch-size auto"),
    ("--batch-size auto --memory-budget 1024TiB", "memory_budget: 1024.00 TiB is more than this machine's memory"),
    ("--memory-budget lots", "argument --memory-budget: 'lots' is not a size"),
    ("--memory-budget 0", "memory_budget: must be at least 1"),
    ("--batch-size auto --slurm partition=debug", "a Slurm job trains on another"),
]

ENVIRONMENT = [
    ({"GRADIENT_ACCUMULATION_STEPS": "four"}, "'four' is not an integer"),
    ({"USE_DEEPSPEED": "maybe"}, "'maybe' is not a boolean"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "'fp8' is not a precision"),
    ({"DEEPSPEED_ZERO_STAGE": "5"}, "ZeRO stage must be 0, 1, 2 or 3"),
    ({"DEEPSPEED_OFFLOAD_PARAM": "cpu"}, "parameter offload needs ZeRO stage 3"),
]


def _one_clear_line(shell, capsys, folder: Path, cell: str, words: str) -> None:
    before, files = nexa_nb.last_result(), sorted(folder.rglob("*"))
    result = shell.run_cell(cell)
    out = capsys.readouterr()
    assert isinstance(result.error_in_exec, UsageError), (cell, result.error_in_exec)
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), out.err
    assert words in lines[0], lines[0]
    assert "Fix" in lines[0] or "fix" in lines[0] or "; " in lines[0], lines[0]  # names what to do
    assert "Traceback" not in out.out + out.err
    assert "nexa:" not in out.out  # no run started: the console prints its header first
    assert nexa_nb.last_result() is before and sorted(folder.rglob("*")) == files


@pytest.mark.parametrize("line, words", CATALOGUE, ids=[line or "empty" for line, _ in CATALOGUE])
def test_bad_input_gives_one_clear_line(shell, nexa, tmp_path, capsys, line, words):
    shell.user_ns.update(prepare_inputs(tmp_path))
    _one_clear_line(shell, capsys, tmp_path, f"%nexa_train {line}", words)


@pytest.mark.parametrize("environ, words", ENVIRONMENT, ids=[next(iter(e)) for e, _ in ENVIRONMENT])
def test_bad_environment_gives_one_clear_line(shell, nexa, tmp_path, capsys, monkeypatch, environ, words):
    shell.user_ns["task"] = linear_task()
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    _one_clear_line(shell, capsys, tmp_path, "%nexa_train", words)


def test_the_catalogue_is_at_least_forty_distinct_inputs():
    assert len({line for line, _ in CATALOGUE}) + len(ENVIRONMENT) >= 40
