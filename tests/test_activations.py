"""The activation estimate, traced on fake tensors, against what a real training step saves and holds.

Models: an MLP, a BERT-style classifier and a GPT-2-style language model (transformers
configurations, random weights, no downloads).  The real step runs on the CPU with the same
batch; what autograd saves is counted by this file's own saved-tensor hooks (by storage
address, parameters left out), independently of `nexa_nb.activations`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import nexa_nb
from nexa_nb.activations import estimate_activations, run_step, trace_first_step
from nexa_nb.config import resolve_config
from nexa_nb.engine.runtime import build_model
from nexa_nb.hardware import Hardware
from nexa_nb.memory import count_params
from nexa_nb.plan import make_plan

GIB = 2**30
CPU = Hardware(cpu_cores=2, host_memory_bytes=16 * GIB, host_available_bytes=12 * GIB)
# Fake and real tensors follow the same kernels' shape rules; the one difference seen: transformers drops
# an all-ones attention mask after looking at its values, which fake tensors do not have, so the traced
# BERT step keeps a boolean mask (1 byte per query-key pair) that the real one does not: 2.4% over here.
TOLERANCE = 0.05
MICRO = 4
SEQ = 32


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
    )


def bert():
    config = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config)


def gpt2():
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def samples(kind: str, n: int = 2 * MICRO):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return [(torch.randn(64, generator=g), torch.randn(1, generator=g)) for _ in range(n)]
    ids = [torch.randint(0, 500, (SEQ,), generator=g) for _ in range(n)]
    if kind == "bert":
        return [{"input_ids": i, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": i[0] % 2} for i in ids]
    return [{"input_ids": i, "labels": i} for i in ids]


MODELS = {"mlp": mlp, "bert": bert, "gpt2": gpt2}


def mse(outputs, batch):
    return torch.nn.functional.mse_loss(outputs, batch[-1])


def task_of(kind: str) -> nexa_nb.Task:
    return nexa_nb.Task(MODELS[kind], samples(kind), loss_fn=mse if kind == "mlp" else None)


def plan_of(**arguments):
    return make_plan(resolve_config(environ={}, arguments={"batch_size": MICRO, **arguments}), CPU)


def collate(task, n):
    return torch.utils.data.default_collate(task.train_data[:n])


def real_saved_bytes(model, batch, task) -> int:
    """What autograd saves in a real forward, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = (task.forward or nexa_nb.engine.batches.default_forward)(model, batch)
        loss = nexa_nb.engine.batches.extract_loss(outputs, batch, task.loss_fn)
    loss.backward()
    model.zero_grad(set_to_none=True)  # as the optimizer leaves them after each step
    return sum(saved.values())


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_traced_estimate_matches_a_real_step(kind, grad_ckpt):
    task = task_of(kind)
    plan = plan_of(grad_ckpt=grad_ckpt)
    estimate = estimate_activations(task, plan, collate(task, MICRO), MICRO)
    assert estimate.method == "traced" and estimate.grad_ckpt == grad_ckpt

    torch.manual_seed(0)
    model = build_model(task, plan)
    real = {n: real_saved_bytes(model, collate(task, n), task) for n in (MICRO, 2 * MICRO)}
    real_per_sample = (real[2 * MICRO] - real[MICRO]) // MICRO
    assert estimate.saved_per_sample_bytes == pytest.approx(real_per_sample, rel=TOLERANCE)
    saved_at_micro = estimate.saved_fixed_bytes + estimate.saved_per_sample_bytes * MICRO
    assert saved_at_micro == pytest.approx(real[MICRO], rel=TOLERANCE)
    # The peak adds the largest transient to what is saved; followed the same way on real tensors.
    peak = run_step(model, collate(task, MICRO), task, "no", cast_model=False).peak_bytes
    assert estimate.at(MICRO) == pytest.approx(peak, rel=TOLERANCE)
    assert estimate.at(MICRO) >= saved_at_micro > 0


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_checkpointing_saves_less(kind):
    task = task_of(kind)
    plain, checkpointed = (
        estimate_activations(task, plan_of(grad_ckpt=ckpt), collate(task, MICRO), MICRO) for ckpt in (False, True)
    )
    assert checkpointed.at(MICRO) < plain.at(MICRO)
    assert checkpointed.per_sample_bytes < plain.per_sample_bytes


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_16_bit_deepspeed_plan_is_traced_in_16_bits(kind):
    task = task_of(kind)
    full = estimate_activations(task, plan_of(zero=2), collate(task, MICRO), MICRO)
    half = estimate_activations(task, plan_of(zero=2, precision="bf16"), collate(task, MICRO), MICRO)
    assert half.precision == "bf16" and half.per_sample_bytes < 0.8 * full.per_sample_bytes
    torch.manual_seed(0)
    model = build_model(task, plan_of()).to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    real = real_saved_bytes(model, collate(task, MICRO), task)
    assert half.saved_fixed_bytes + half.saved_per_sample_bytes * MICRO == pytest.approx(real, rel=TOLERANCE)


def test_a_module_is_traced_without_changing_it():
    model = gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = nexa_nb.Task(model, samples("gpt2"))
    estimate = estimate_activations(task, plan_of(grad_ckpt=True), collate(task, MICRO), MICRO)
    assert estimate.per_sample_bytes > 0
    assert not model.is_activation_checkpointing
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_first_step_counts_parameters_as_deepspeed_does(kind):
    first = trace_first_step(task_of(kind), plan_of(), collate(task_of(kind), MICRO))
    assert (first.total_params, first.largest_layer_params) == count_params(MODELS[kind]())
    assert [a.grad_ckpt for a in first.activations] == [False, True]
    # the same figures as a trace of its own: the first step's model and batch share one fake mode
    assert first.activations[0] == estimate_activations(task_of(kind), plan_of(), collate(task_of(kind), MICRO), MICRO)


def test_a_lora_plan_is_traced_with_its_adapters():
    task = task_of("gpt2")
    plan = plan_of(lora=True)
    estimate = estimate_activations(task, plan, collate(task, MICRO), MICRO)
    torch.manual_seed(0)
    model = build_model(task, plan)  # peft's adapters on the real model, as a worker builds it
    real = real_saved_bytes(model, collate(task, MICRO), task)
    assert estimate.saved_fixed_bytes + estimate.saved_per_sample_bytes * MICRO == pytest.approx(real, rel=TOLERANCE)
    full = estimate_activations(task, plan_of(), collate(task, MICRO), MICRO)
    assert estimate.saved_per_sample_bytes != full.saved_per_sample_bytes  # frozen weights save other tensors
