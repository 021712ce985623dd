"""The memory plan against DeepSpeed's own estimators, and the recommendations built on it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.zero import stage3
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)

from nexa_nb.memory import (
    CUDA_CONTEXT_BYTES,
    DEEPSPEED_BUCKET_BYTES,
    ActivationEstimate,
    Recommendation,
    StateMemory,
    count_params,
    memory_table,
    model_state_memory,
    recommend,
    usable_bytes,
)
from nexa_nb.text import format_bytes

GIB = 2**30
SIZES = [(10_000_000, 1_000_000), (350_000_000, 50_000_000), (7_000_000_000, 500_000_000)]
GPUS_PER_NODE = [1, 2, 8]
NODES = [1, 2]


def close(ours: int, theirs: int) -> bool:
    return ours == pytest.approx(theirs, rel=0.01)


# --- model_state_memory equals DeepSpeed's estimators --------------------------------------


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("gpus_per_node", GPUS_PER_NODE)
@pytest.mark.parametrize("num_nodes", NODES)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("offload", ["none", "cpu", "nvme"])
def test_zero2_matches_deepspeed(total, largest, gpus_per_node, num_nodes, stage, offload):
    ours = model_state_memory(
        total, largest, stage=stage, offload_optimizer=offload, gpus_per_node=gpus_per_node, num_nodes=num_nodes
    )
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        total, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes, cpu_offload=offload != "none"
    )
    assert close(ours.device_bytes, gpu)
    assert close(ours.host_bytes, cpu)


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("gpus_per_node", GPUS_PER_NODE)
@pytest.mark.parametrize("num_nodes", NODES)
@pytest.mark.parametrize("offload_optimizer,offload_param", [("none", "none"), ("cpu", "none"), ("cpu", "cpu")])
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero3_matches_deepspeed(total, largest, gpus_per_node, num_nodes, offload_optimizer, offload_param, zero_init):
    ours = model_state_memory(
        total,
        largest,
        stage=3,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        zero_init=zero_init,
    )
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total,
        largest,
        num_gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        cpu_offload=offload_optimizer != "none",
        cpu_offload_params=offload_param != "none",
        zero_init=zero_init,
    )
    assert close(ours.device_bytes, gpu)
    assert close(ours.host_bytes, cpu)


def _printed_rows(text: str) -> dict[str, tuple[float, float]]:
    """The rows `*_all_cold` prints: options -> (GB per CPU, GB per GPU).  Some Python versions
    print the offload device as ``OffloadDeviceEnum.cpu``, others as ``cpu``."""
    rows = {}
    for cpu, gpu, options in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", text, re.MULTILINE):
        rows[re.sub(r"\s+|OffloadDeviceEnum\.", "", options)] = (float(cpu), float(gpu))
    return rows


def test_zero2_agrees_with_the_printed_table(capsys):
    total, largest = SIZES[2]
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=8, num_nodes=2)
    rows = _printed_rows(capsys.readouterr().out)
    assert len(rows) == 2
    for offload in ("none", "cpu"):
        ours = model_state_memory(total, largest, stage=2, offload_optimizer=offload, gpus_per_node=8, num_nodes=2)
        cpu_gb, gpu_gb = rows[f"offload_optimizer={offload}"]
        assert ours.host_bytes / GIB == pytest.approx(cpu_gb, abs=0.01)
        assert ours.device_bytes / GIB == pytest.approx(gpu_gb, abs=0.01)


def test_zero3_agrees_with_the_printed_table(capsys):
    total, largest = SIZES[1]
    stage3.estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=2, num_nodes=2)
    rows = _printed_rows(capsys.readouterr().out)
    assert len(rows) == 6
    for offload_optimizer, offload_param in (("none", "none"), ("cpu", "none"), ("cpu", "cpu")):
        for zero_init in (True, False):
            ours = model_state_memory(
                total,
                largest,
                stage=3,
                offload_optimizer=offload_optimizer,
                offload_param=offload_param,
                gpus_per_node=2,
                num_nodes=2,
                zero_init=zero_init,
            )
            key = f"offload_param={offload_param},offload_optimizer={offload_optimizer},zero_init={int(zero_init)}"
            cpu_gb, gpu_gb = rows[key]
            assert ours.host_bytes / GIB == pytest.approx(cpu_gb, abs=0.01)
            assert ours.device_bytes / GIB == pytest.approx(gpu_gb, abs=0.01)


# --- the setups DeepSpeed has no estimator for -----------------------------------------------


def test_plain_and_stage0_are_unpartitioned():
    total, largest = SIZES[1]
    for gpus in (1, 8):
        assert model_state_memory(total, largest, stage=None, gpus_per_node=gpus).device_bytes == 16 * total
        assert model_state_memory(total, largest, stage=0, gpus_per_node=gpus).device_bytes == 20 * total
    # On one device ZeRO-2 partitions nothing: it costs what stage 0 does.
    assert (
        model_state_memory(total, largest, stage=2).device_bytes
        == model_state_memory(total, largest, stage=0).device_bytes
    )


def test_nvme_keeps_state_off_host_only_in_stage3():
    total, largest = SIZES[2]
    cpu3 = model_state_memory(total, largest, stage=3, offload_optimizer="cpu", offload_param="cpu")
    nvme3 = model_state_memory(total, largest, stage=3, offload_optimizer="nvme", offload_param="nvme")
    none3 = model_state_memory(total, largest, stage=3)
    assert nvme3.device_bytes == cpu3.device_bytes
    assert nvme3.host_bytes == none3.host_bytes < cpu3.host_bytes
    mixed = model_state_memory(total, largest, stage=3, offload_optimizer="nvme", offload_param="cpu")
    assert mixed.host_bytes == int(total * 2 * 1.5)  # only the 16-bit parameters stay on the host
    # Stages 1 and 2 have no NVMe swapper: the state stays in host memory.
    assert model_state_memory(total, largest, stage=2, offload_optimizer="nvme") == StateMemory(
        2, "nvme", "none", *_zero2(total, offload=True)
    )


def _zero2(total: int, offload: bool) -> tuple[int, int]:
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, cpu_offload=offload)
    return gpu, cpu


def test_param_offload_without_optimizer_offload():
    total, largest = SIZES[1]
    row = model_state_memory(total, largest, stage=3, offload_param="cpu", gpus_per_node=4)
    assert row.device_bytes == 4 * largest + int(16 * total / 4)
    assert row.host_bytes == int(total * 2 * 1.5)


def test_fp32_runs_count_4_byte_weights_and_gradients():
    total, largest = SIZES[1]
    assert model_state_memory(total, largest, stage=0, weight_bytes=4).device_bytes == 16 * total  # torch's AdamW
    assert model_state_memory(total, largest, stage=2, weight_bytes=4, gpus_per_node=4).device_bytes == (
        4 * total + int(20 * total / 4)
    )
    zero3 = model_state_memory(total, largest, stage=3, weight_bytes=4, gpus_per_node=2)
    assert zero3.device_bytes == 8 * largest + int(22 * total / 2)
    assert zero3.host_bytes == model_state_memory(total, largest, stage=3, gpus_per_node=2).host_bytes
    with pytest.raises(ValueError, match="weight_bytes must be 2"):
        model_state_memory(total, largest, stage=3, weight_bytes=3)


def test_memory_table_rows():
    total, largest = SIZES[2]
    rows = memory_table(total, largest, gpus_per_node=8)
    assert [(r.stage, r.offload_optimizer, r.offload_param) for r in rows] == [
        (None, "none", "none"),
        (0, "none", "none"),
        (1, "none", "none"),
        (2, "none", "none"),
        (2, "cpu", "none"),
        (3, "none", "none"),
        (3, "cpu", "none"),
        (3, "cpu", "cpu"),
    ]
    by_setup = {(r.stage, r.offload_optimizer, r.offload_param): r.device_bytes for r in rows}
    assert by_setup[(1, "none", "none")] == by_setup[(2, "none", "none")]
    assert by_setup[(2, "none", "none")] < by_setup[(None, "none", "none")] < by_setup[(0, "none", "none")]
    assert by_setup[(3, "cpu", "cpu")] == min(by_setup.values())


# --- count_params is DeepSpeed's model_to_params ---------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16, device=device)
        self.blocks = torch.nn.Sequential(
            torch.nn.Linear(16, 64, device=device), torch.nn.GELU(), torch.nn.Linear(64, 16, device=device)
        )
        self.norm = torch.nn.LayerNorm(16, device=device)
        self.head = torch.nn.Linear(16, 100, bias=False, device=device)
        self.head.weight = self.embed.weight  # tied, counted once


def test_count_params_matches_deepspeed():
    model = TinyLM()
    assert (
        count_params(model) == stage3.model_to_params(model) == (100 * 16 + 16 * 64 + 64 + 64 * 16 + 16 + 32, 100 * 16)
    )


def test_count_params_on_meta_device():
    assert count_params(TinyLM(device="meta")) == count_params(TinyLM())


# --- recommend --------------------------------------------------------------------------------


def test_7b_on_one_80gb_device_offloads():
    rec = recommend(7_000_000_000, 500_000_000, device_bytes_available=80 * GIB, host_bytes_available=512 * GIB)
    assert isinstance(rec, Recommendation)
    assert rec.offload_optimizer == "cpu"
    assert (rec.stage, rec.offload_param) == (2, "none")
    assert rec.micro_batch == 8 and "not estimated" in rec.reason
    assert f"{format_bytes(rec.device_bytes)} per device" in rec.reason
    assert rec.device_bytes == 2 * 7_000_000_000 + CUDA_CONTEXT_BYTES + DEEPSPEED_BUCKET_BYTES
    assert "activation_bytes_per_sample" not in rec.reason  # no advice to pass a figure nobody has


def test_100m_on_80gb_needs_no_deepspeed():
    rec = recommend(100_000_000, 10_000_000, device_bytes_available=80 * GIB, host_bytes_available=64 * GIB)
    assert (rec.stage, rec.offload_optimizer, rec.offload_param) == (None, "none", "none")
    assert rec.device_bytes == 16 * 100_000_000 + CUDA_CONTEXT_BYTES


def test_7b_on_eight_devices_shards_instead_of_offloading():
    rec = recommend(
        7_000_000_000, 500_000_000, device_bytes_available=80 * GIB, host_bytes_available=512 * GIB, gpus_per_node=8
    )
    assert (rec.stage, rec.offload_optimizer) == (2, "none")
    assert "the faster plain Accelerate (no DeepSpeed) would need 104.81 GiB per device (104.31 GiB" in rec.reason


def bare(**kwargs):
    """`recommend` for a 100M model without framework overhead, so that the arithmetic shows."""
    return recommend(100_000_000, 10_000_000, host_bytes_available=64 * GIB, framework_base_bytes=0, **kwargs)


def test_micro_batch_shrinks_with_memory():
    # 1.6 GB of states; (0.9 - 0.1) x capacity usable; ZeRO-2 offload (0.2 GB) takes over below 4 GiB.
    batches = [
        bare(device_bytes_available=gib * GIB, activation_bytes_per_sample=GIB).micro_batch for gib in (80, 16, 8, 4, 3)
    ]
    assert batches == [8, 8, 4, 1, 2]
    assert bare(device_bytes_available=3 * GIB, activation_bytes_per_sample=GIB).stage == 2


def test_micro_batch_divides_the_samples_per_step():
    kwargs = {"device_bytes_available": 80 * GIB, "activation_bytes_per_sample": GIB}
    assert bare(wanted_micro_batch=12, **kwargs).micro_batch == 12
    rec = bare(wanted_micro_batch=100, **kwargs)  # 64 would fit, but 100 samples are 50 x 2, not 64 x something
    assert (rec.micro_batch, rec.grad_accum) == (50, 2)


def test_the_budget_is_usage_less_margin():
    # 16 GiB x (0.9 - 0.1) = 12.8 GiB: 11 samples of 1 GiB fit beside 1.6 GB of states, 12 do not.
    assert (
        bare(device_bytes_available=16 * GIB, activation_bytes_per_sample=GIB, wanted_micro_batch=11).micro_batch == 11
    )
    assert (
        bare(device_bytes_available=16 * GIB, activation_bytes_per_sample=GIB, wanted_micro_batch=12).micro_batch == 6
    )
    loose = bare(
        device_bytes_available=16 * GIB,
        activation_bytes_per_sample=GIB,
        wanted_micro_batch=12,
        max_memory_usage=1.0,
        memory_safety_margin=0.0,
    )
    assert loose.micro_batch == 12
    assert usable_bytes(16 * GIB) == int(0.8 * 16 * GIB)


def test_checkpointing_is_turned_on_when_activations_need_it():
    plain = ActivationEstimate(GIB, grad_ckpt=False)
    checkpointed = ActivationEstimate(GIB // 4, grad_ckpt=True)
    roomy = bare(device_bytes_available=80 * GIB, activations=(plain, checkpointed))
    assert (roomy.micro_batch, roomy.grad_ckpt) == (8, False)
    tight = bare(device_bytes_available=8 * GIB, activations=(plain, checkpointed))
    assert (tight.stage, tight.micro_batch, tight.grad_accum, tight.grad_ckpt) == (None, 8, 1, True)
    assert "checkpointed" in tight.reason
    assert tight.activation_bytes == 2 * GIB and tight.device_bytes == 1_600_000_000 + 2 * GIB


def test_fixed_activation_bytes_count_once():
    estimate = ActivationEstimate(per_sample_bytes=GIB, fixed_bytes=3 * GIB)
    rec = bare(device_bytes_available=16 * GIB, activations=(estimate,))
    # 12.8 GiB usable - 1.49 GiB of states - 3 GiB fixed leaves 8.3 GiB: micro-batch 8
    assert rec.micro_batch == 8 and rec.activation_bytes == 11 * GIB


def test_activations_push_to_offload():
    # 1B params: plain Accelerate's 16 GB of states leave no room for 8 GiB of activations on 24 GiB.
    rec = recommend(
        1_000_000_000,
        100_000_000,
        device_bytes_available=24 * GIB,
        host_bytes_available=128 * GIB,
        activation_bytes_per_sample=8 * GIB,
        framework_base_bytes=0,
    )
    assert (rec.stage, rec.offload_optimizer, rec.micro_batch, rec.grad_accum) == (2, "cpu", 2, 4)
    assert rec.device_bytes == 2 * 1_000_000_000 + DEEPSPEED_BUCKET_BYTES + 2 * 8 * GIB


def test_impossible_says_it_will_not_fit_and_by_how_much():
    rec = recommend(
        70_000_000_000,
        20_000_000_000,
        device_bytes_available=24 * GIB,
        host_bytes_available=4096 * GIB,
        activation_bytes_per_sample=GIB,
    )
    assert (rec.stage, rec.offload_optimizer, rec.offload_param, rec.micro_batch) == (3, "cpu", "cpu", 1)
    assert "will not fit" in rec.reason
    short = 4 * 20_000_000_000 + CUDA_CONTEXT_BYTES + DEEPSPEED_BUCKET_BYTES + GIB - int(0.8 * 24 * GIB)
    assert f"{format_bytes(short)} more per device" in rec.reason


def test_short_host_memory_points_to_nvme():
    rec = recommend(7_000_000_000, 500_000_000, device_bytes_available=80 * GIB, host_bytes_available=64 * GIB)
    assert "will not fit" in rec.reason and "more host memory" in rec.reason and "NVMe" in rec.reason


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,fix",
    [
        ({"total_params": -1, "largest_layer_params": 0, "stage": 2}, "count_params"),
        ({"total_params": 10, "largest_layer_params": 20, "stage": 2}, "count_params"),
        ({"total_params": 10, "largest_layer_params": 1, "stage": 5}, "stage=None"),
        ({"total_params": 10, "largest_layer_params": 1, "stage": 2, "offload_optimizer": "disk"}, "none, cpu, nvme"),
        ({"total_params": 10, "largest_layer_params": 1, "stage": 2, "offload_param": "cpu"}, "pass stage=3"),
        ({"total_params": 10, "largest_layer_params": 1, "stage": None, "offload_optimizer": "cpu"}, "pass stage=2"),
        ({"total_params": 10, "largest_layer_params": 1, "stage": 2, "gpus_per_node": 0}, "pass 1"),
    ],
)
def test_bad_setup_names_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        model_state_memory(**kwargs)


@pytest.mark.parametrize(
    "kwargs,fix",
    [
        ({"device_bytes_available": 0, "host_bytes_available": GIB}, "memory of one training device"),
        ({"device_bytes_available": GIB, "host_bytes_available": GIB, "max_memory_usage": 1.5}, "pass 0.9"),
        ({"device_bytes_available": GIB, "host_bytes_available": GIB, "max_memory_usage": 0}, "pass 0.9"),
        ({"device_bytes_available": GIB, "host_bytes_available": GIB, "memory_safety_margin": -0.1}, "pass 0.1"),
        ({"device_bytes_available": GIB, "host_bytes_available": GIB, "memory_safety_margin": 0.9}, "pass 0.1"),
        ({"device_bytes_available": GIB, "host_bytes_available": GIB, "activation_bytes_per_sample": -1}, "None"),
    ],
)
def test_bad_recommend_input_names_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        recommend(1000, 100, **kwargs)


# --- small things -----------------------------------------------------------------------------


def test_import_loads_neither_torch_nor_deepspeed():
    code = "import sys, nexa_nb.memory; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
