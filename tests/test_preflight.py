"""The first step traced before any process starts: the plan's activations, its notes, and the kernel's memory.

A model factory is built on fake tensors in the kernel, so its mistakes surface there (the
catalogue in tests/test_bad_inputs.py) and its activations size the micro-batch, without the
kernel ever holding the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nexa_nb
from nexa_nb.api import prepare
from nexa_nb.commands import plan as plan_command
from nexa_nb.config import resolve_config
from nexa_nb.hardware import Hardware
from nexa_nb.plan import make_plan
from nexa_nb.session import Session
from tests.test_magics import CPU_HOST, nexa, usage_error  # noqa: F401  (fixtures)

GIB = 2**30
CPU = Hardware(cpu_cores=2, host_memory_bytes=16 * GIB, host_available_bytes=12 * GIB)


def gpt2():
    config = GPT2Config(
        vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def lm_task(n: int = 32, length: int = 64) -> nexa_nb.Task:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 1000, (length,), generator=g) for _ in range(n)]
    return nexa_nb.Task(gpt2, [{"input_ids": r, "labels": r} for r in rows], name="lm")


def config(**arguments):
    return resolve_config(environ={}, arguments={"batch_size": 4, **arguments})


def test_a_factory_is_planned_with_its_parameters_and_activations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = prepare(lm_task(), config())
    assert (plan.total_params, plan.largest_layer_params) == nexa_nb.memory.count_params(gpt2())
    plain, checkpointed = plan.activations
    assert (plain.grad_ckpt, checkpointed.grad_ckpt) == (False, True)
    assert plain.method == "traced" and checkpointed.per_sample_bytes < plain.per_sample_bytes
    states = nexa_nb.memory.model_state_memory(plan.total_params, plan.largest_layer_params, stage=None)
    assert plan.planned_device_bytes == states.device_bytes + nexa_nb.memory.CPU_WORKER_BYTES + plain.at(4)
    assert plan.recommendation.grad_ckpt is False and plan.recommendation.micro_batch == 4
    assert "activations at micro-batch 4" in plan.recommendation.reason


def test_a_micro_batch_the_device_cannot_hold_gets_a_note_with_one_that_fits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    activations = prepare(lm_task(), config()).activations
    states = nexa_nb.memory.model_state_memory(*nexa_nb.memory.count_params(gpt2()), stage=None).device_bytes
    # a device where 64 samples do not fit without checkpointing: room for states, the worker and 40 samples
    room = states + nexa_nb.memory.CPU_WORKER_BYTES + activations[0].at(40)
    small = replace(CPU, host_available_bytes=int(room / 0.8))
    plan = make_plan(
        config(batch_size=64), small, total_params=sum(p.numel() for p in gpt2().parameters()), activations=activations
    )
    best = plan.recommendation
    assert best.micro_batch * best.grad_accum == 64
    assert best.grad_ckpt is True or best.micro_batch < 64
    [note] = [n for n in plan.notes if "at micro-batch 64" in n]
    assert "more than the" in note and f"--batch-size {best.micro_batch}" in note


def test_a_module_under_zero3_is_noted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = lm_task()
    task.model = gpt2()
    notes = prepare(task, config(zero=3)).notes
    assert any("the whole model is built in this kernel before ZeRO-3" in n for n in notes)
    assert not any("ZeRO-3" in n for n in prepare(lm_task(), config(zero=3)).notes)


def test_more_processes_than_cores_is_noted():
    plan = make_plan(config(procs=3), replace(CPU, cpu_cores=1))
    assert any("3 processes share 1 usable core(s)" in n for n in plan.notes)
    assert not any("usable core" in n for n in make_plan(config(procs=2), CPU).notes)


def test_lora_on_a_module_of_ones_own_says_which_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    pairs = [(torch.randn(8), torch.randn(1)) for _ in range(16)]
    task = nexa_nb.Task(mlp, pairs, loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[-1]))
    [note] = [n for n in prepare(task, config(lora=True)).notes if "LoRA" in n]
    assert "adapts every nn.Linear: 2 layer(s) named 0, 2" in note and "--lora-target-modules" in note


def test_nexa_plan_shows_activations_per_setup_and_the_micro_batch(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("nexa_nb.commands.plan.probe", lambda: CPU_HOST)
    args = argparse.Namespace(params=None, largest_layer=None, gpus=None, gpu_mem=None, task="lm")
    plan_command.run(Session(defaults={"batch_size": 4}), args, task=lm_task(), counted="counted from lm's model")
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("activations: ") and "with gradient checkpointing" in out[2]
    assert out[3].split() == [
        "setup",
        "model",
        "states",
        "micro-batch",
        "activations",
        "per",
        "device",
        "host",
        "NVMe",
        "disk",
    ]
    assert out[4].startswith("plain Accelerate") and "4" in out[4].split()
    assert out[-2].startswith("recommended: plain Accelerate (no --zero) --batch-size 4 --grad-accum 1")
    assert "activations at micro-batch 4" in out[-1]


def test_nexa_plan_has_no_flag_for_activation_bytes(shell, nexa):  # noqa: F811  (fixtures)
    message = usage_error(shell, "nexa_plan", "--params 1B --activation-bytes-per-sample 1000")
    assert "unrecognized arguments: --activation-bytes-per-sample" in message


PEAK_RSS = textwrap.dedent(
    """
    import json, resource, sys, torch, transformers, nexa_nb
    from nexa_nb.api import prepare
    from nexa_nb.config import resolve_config

    def gpt2(layers, width, vocab):
        config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=256)
        return lambda: transformers.GPT2LMHeadModel(config)

    def task(vocab, factory):
        rows = [torch.randint(0, vocab, (128,)) for _ in range(8)]
        return nexa_nb.Task(factory, [{"input_ids": r, "labels": r} for r in rows])

    def peak(who):
        return resource.getrusage(who).ru_maxrss * 1024

    cfg = resolve_config(environ={}, arguments={"batch_size": 4})
    prepare(task(100, gpt2(1, 32, 100)), cfg)  # a tiny model: the imports and caches any trace makes
    kernel, tiny_trace = peak(resource.RUSAGE_SELF), peak(resource.RUSAGE_CHILDREN)
    plan = prepare(task(50257, gpt2(12, 768, 50257)), cfg)
    found = {
        "params": plan.total_params,
        "traced": len(plan.activations),
        "kernel": peak(resource.RUSAGE_SELF) - kernel,
        "trace": peak(resource.RUSAGE_CHILDREN) - tiny_trace,  # the peak of the process the trace ran in
    }
    print(json.dumps(found))
    """
)


def test_the_preflight_allocates_no_model_sized_memory(tmp_path):
    """GPT-2 small (124M parameters, 0.5 GB in fp32, 3 GB of activations at micro-batch 4): while its
    factory is built and its first step traced, the kernel's peak memory does not grow, and the
    process forked for the trace peaks within 5% of the weights of where a tiny model's trace did."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    found = json.loads(out.splitlines()[-1])
    assert found["params"] == 123_849_984 and found["traced"] == 2
    assert found["kernel"] < 0.05 * 4 * found["params"], found  # under 5% of the fp32 weights alone
    assert found["trace"] < 0.05 * 4 * found["params"], found


@pytest.mark.parametrize("arguments", [{"zero": 2, "precision": "bf16"}, {"grad_ckpt": True}])
def test_the_plan_traces_what_the_workers_will_run(tmp_path, monkeypatch, arguments):
    monkeypatch.chdir(tmp_path)
    plan = prepare(lm_task(), config(**arguments))
    assert all(a.precision == plan.precision for a in plan.activations)
    assert plan.planned_device_bytes is not None


class CountingForward:
    """A forward with a state of its own, as benchmark clocks and call counters have."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return model(**batch)


def test_a_forward_with_a_state_reaches_the_workers_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = lm_task()
    task.forward = CountingForward()
    assert prepare(task, config()).activations  # traced, with a copy of the forward
    assert task.forward.calls == 0


class GatedMlp(torch.nn.Module):
    """A forward that reads a tensor's value in Python, which fake tensors cannot trace."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))

    def forward(self, x):
        return self.body(x) if float(x.abs().sum()) > 0 else torch.zeros(len(x), 1)


def test_a_model_fake_tensors_cannot_run_is_measured_and_the_plan_says_so(tmp_path, monkeypatch):
    from nexa_nb.activations import run_step

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    task = nexa_nb.Task(GatedMlp, data, loss_fn=lambda out, batch: torch.nn.functional.mse_loss(out, batch[1]))
    plan = prepare(task, config(batch_size=8))
    [measured] = plan.activations
    assert measured.method == "measured" and measured.per_sample_bytes > 0
    assert any("activations measured on real tensors" in n and "fake tensors" in n for n in plan.notes), plan.notes
    assert (plan.total_params, plan.largest_layer_params) == nexa_nb.memory.count_params(GatedMlp())
    # The figure is a real step's: saved and peak bytes of 8 and 16 samples, per sample.
    model = GatedMlp()
    steps = [run_step(model, (x[:n], x[:n].sum(1, keepdim=True)), task, "no", cast_model=False) for n in (8, 16)]
    assert measured.per_sample_bytes == (steps[1].peak_bytes - steps[0].peak_bytes) // 8
