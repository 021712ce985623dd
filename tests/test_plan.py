"""Config + simulated hardware -> plan: fallbacks, Accelerator arguments, DeepSpeed config, batch and lr."""

from __future__ import annotations

import math

import pytest

from nexa_nb.config import ConfigError, resolve_config
from nexa_nb.hardware import Gpu, Hardware
from nexa_nb.plan import make_plan

GIB = 2**30
CPU = Hardware(cpu_cores=2, host_memory_bytes=16 * GIB, host_available_bytes=12 * GIB)
A100 = Gpu("NVIDIA A100-SXM4-80GB", 80 * GIB, 8.0)
GPU = Hardware(
    gpus=(A100, A100), cpu_cores=16, host_memory_bytes=256 * GIB, host_available_bytes=200 * GIB, bf16_gpu=True
)
T4 = Hardware(
    gpus=(Gpu("Tesla T4", 16 * GIB, 7.5),),
    cpu_cores=8,
    host_memory_bytes=64 * GIB,
    host_available_bytes=50 * GIB,
    bf16_gpu=False,
)


def plan(hardware=CPU, **arguments):
    return make_plan(resolve_config(environ={}, arguments=arguments), hardware)


def values(tree):
    """Every leaf value of a nested dict."""
    for value in tree.values():
        if isinstance(value, dict):
            yield from values(value)
        else:
            yield value


# --- precision fallbacks ----------------------------------------------------------------


def test_fp16_on_cpu_falls_back_to_bf16_with_one_note():
    p = plan(precision="fp16")
    assert p.precision == "bf16"
    assert p.accelerator_kwargs["mixed_precision"] == "bf16"
    assert len(p.notes) == 1 and "fp16" in p.notes[0] and "bf16" in p.notes[0]
    assert f"note: {p.notes[0]}" in p.describe()


def test_bf16_on_a_gpu_without_bf16_falls_back_to_fp16_with_one_note():
    p = plan(T4, precision="bf16")
    assert p.precision == "fp16" and len(p.notes) == 1


@pytest.mark.parametrize("hardware, precision", [(CPU, "fp16"), (T4, "bf16")])
def test_strict_mode_turns_the_fallback_into_an_error(hardware, precision):
    with pytest.raises(ConfigError) as info:
        plan(hardware, precision=precision, strict=True)
    assert info.value.field == "precision"
    assert "strict" in info.value.problem and info.value.fix


@pytest.mark.parametrize(
    "hardware, precision", [(CPU, "bf16"), (CPU, "no"), (GPU, "fp16"), (GPU, "bf16"), (T4, "fp16")]
)
def test_supported_precision_runs_as_asked_without_notes(hardware, precision):
    p = plan(hardware, precision=precision, strict=True)
    assert p.precision == precision and p.notes == ()


# --- what Accelerate gets ---------------------------------------------------------------


@pytest.mark.parametrize(
    "hardware, arguments, cpu, distributed_type, device",
    [
        (CPU, {}, True, "NO", "cpu"),
        (CPU, {"procs": 2}, True, "MULTI_CPU", "cpu"),
        (CPU, {"zero": 2}, False, "DEEPSPEED", "cpu"),
        (CPU, {"zero": 3, "procs": 2}, False, "DEEPSPEED", "cpu"),
        (GPU, {}, False, "NO", "cuda"),
        (GPU, {"procs": 2}, False, "MULTI_GPU", "cuda"),
        (GPU, {"zero": 2, "procs": 2}, False, "DEEPSPEED", "cuda"),
        (GPU, {"fsdp": True, "procs": 2}, False, "FSDP", "cuda"),
        (GPU, {"force_cpu": True, "procs": 2}, True, "MULTI_CPU", "cpu"),
    ],
)
def test_accelerator_kwargs(hardware, arguments, cpu, distributed_type, device):
    p = plan(hardware, precision="bf16", grad_accum=2, **arguments)
    assert p.accelerator_kwargs == {"mixed_precision": "bf16", "gradient_accumulation_steps": 2, "cpu": cpu}
    assert (p.distributed_type, p.device) == (distributed_type, device)
    assert p.worker_env["ACCELERATE_USE_DEEPSPEED"] == ("true" if "zero" in arguments else "false")
    assert (p.worker_env.get("CUDA_VISIBLE_DEVICES") == "") == (device == "cpu")


def test_trackers_log_to_the_log_dir_or_the_checkpoint_dir(tmp_path):
    p = plan(trackers=["tensorboard"], ckpt_dir=str(tmp_path / "ckpts"))
    assert p.accelerator_kwargs["log_with"] == ["tensorboard"]
    assert p.accelerator_kwargs["project_dir"] == str(tmp_path / "ckpts")
    assert plan(trackers=["mlflow"], log_dir="logs").accelerator_kwargs["project_dir"] == "logs"
    assert plan(trackers=["mlflow"]).accelerator_kwargs["project_dir"] == "nexa_runs"


def test_no_deepspeed_config_without_zero():
    p = plan(procs=2)
    assert p.deepspeed_config is None and not p.uses_deepspeed and p.deepspeed_json() == "null"


# --- the DeepSpeed config ---------------------------------------------------------------

ZERO_CASES = [
    (0, "none", "none"),
    (1, "none", "none"),
    (1, "cpu", "none"),
    (2, "none", "none"),
    (2, "cpu", "none"),
    (2, "nvme", "none"),
    (3, "none", "none"),
    (3, "cpu", "none"),
    (3, "cpu", "cpu"),
    (3, "nvme", "nvme"),
    (3, "none", "cpu"),
]


@pytest.fixture(params=[CPU, GPU], ids=["cpu", "gpu"])
def hardware(request):
    return request.param


@pytest.mark.parametrize("zero, offload_optimizer, offload_param", ZERO_CASES)
def test_deepspeed_config_is_complete(tmp_path, hardware, zero, offload_optimizer, offload_param):
    p = plan(
        hardware,
        zero=zero,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        nvme_path=str(tmp_path),
        procs=2,
        batch_size=4,
        grad_accum=3,
        precision="bf16",
    )
    ds = p.deepspeed_config
    assert "auto" not in values(ds) and None not in values(ds)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        p.effective_batch,
        4,
        3,
    )
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zo = ds["zero_optimization"]
    assert zo["stage"] == zero
    assert zo["overlap_comm"] == p.device.startswith("cuda")
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if device == "none":
            assert key not in zo
        else:
            expected = {"device": device, "pin_memory": hardware is GPU}
            if device == "nvme":
                expected["nvme_path"] = str(tmp_path)
            assert zo[key] == expected
    assert zo.get("stage3_gather_16bit_weights_on_model_save") is (True if zero == 3 else None)


@pytest.mark.parametrize("zero, offload_optimizer, offload_param", ZERO_CASES)
@pytest.mark.parametrize("procs", [1, 2])
def test_deepspeed_accepts_the_config(tmp_path, monkeypatch, hardware, zero, offload_optimizer, offload_param, procs):
    """DeepSpeed's own parser and checks, with the world size the plan was made for (no process group)."""
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(comm, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda *args, **kwargs: procs)
    p = plan(
        hardware,
        zero=zero,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        nvme_path=str(tmp_path),
        procs=procs,
        batch_size=4,
        target_batch=16 * procs,
        precision="fp16",
    )
    ds = DeepSpeedConfig(p.deepspeed_config)
    assert ds.world_size == procs
    assert (ds.train_batch_size, ds.gradient_accumulation_steps) == (16 * procs, 4)
    assert ds.zero_optimization_stage == zero
    assert ds.float16_config.enabled == (hardware is GPU) and ds.bfloat16_config.enabled == (hardware is CPU)
    assert getattr(ds.zero_config.offload_optimizer, "device", "none") == offload_optimizer
    assert getattr(ds.zero_config.offload_param, "device", "none") == offload_param


def test_clip_norm_none_disables_deepspeed_clipping():
    assert plan(zero=2, clip_norm=None).deepspeed_config["gradient_clipping"] == 0.0
    assert plan(zero=2, clip_norm=0.5).deepspeed_config["gradient_clipping"] == 0.5


def test_offload_on_gpu_notes_the_cpu_adam_build():
    assert any("DeepSpeedCPUAdam" in n for n in plan(GPU, zero=2, offload_optimizer="cpu").notes)
    assert plan(CPU, zero=2, offload_optimizer="cpu").notes == ()


# --- batch arithmetic and learning rate -------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, procs, target_batch, grad_accum",
    [
        (8, 1, 8, 1),
        (8, 1, 64, 8),
        (4, 2, 64, 8),
        (3, 2, 18, 3),
    ],
)
def test_accumulation_from_a_target_batch(batch_size, procs, target_batch, grad_accum):
    p = plan(batch_size=batch_size, procs=procs, target_batch=target_batch, zero=2)
    assert (p.micro_batch, p.grad_accum, p.procs, p.effective_batch) == (batch_size, grad_accum, procs, target_batch)
    assert p.accelerator_kwargs["gradient_accumulation_steps"] == grad_accum
    assert p.deepspeed_config["gradient_accumulation_steps"] == grad_accum
    assert p.deepspeed_config["train_batch_size"] == target_batch


@pytest.mark.parametrize(
    "rule, reference, expected",
    [
        ("none", None, 1e-3),
        ("linear", None, 8e-3),  # effective 64 / batch 8
        ("sqrt", None, 1e-3 * math.sqrt(8)),
        ("linear", 32, 2e-3),  # effective 64 / reference 32
        ("sqrt", 16, 2e-3),  # sqrt(64 / 16)
        ("linear", 128, 0.5e-3),  # a larger reference scales down
    ],
)
def test_lr_scaling(rule, reference, expected):
    p = plan(lr=1e-3, batch_size=8, procs=2, grad_accum=4, lr_scaling=rule, lr_reference_batch=reference)
    assert p.effective_batch == 64
    assert p.lr == pytest.approx(expected)
    assert len(p.notes) == (0 if rule == "none" else 1)


# --- impossible on this hardware --------------------------------------------------------


def test_more_processes_than_gpus_is_an_error():
    with pytest.raises(ConfigError) as info:
        plan(GPU, procs=3)
    assert info.value.field == "procs" and "--procs 2" in info.value.fix


def test_too_many_cpu_processes_is_an_error():
    with pytest.raises(ConfigError) as info:
        plan(CPU, procs=9)
    assert info.value.field == "procs" and "--procs 2" in info.value.fix


def test_fsdp_on_cpu_is_an_error():
    with pytest.raises(ConfigError) as info:
        plan(CPU, fsdp=True)
    assert info.value.field == "fsdp" and info.value.fix


def test_fsdp_with_force_cpu_on_a_gpu_host_is_an_error():
    with pytest.raises(ConfigError):
        plan(GPU, fsdp=True, force_cpu=True)


@pytest.mark.parametrize(
    "hardware, arguments, first_line",
    [
        (
            GPU,
            {"zero": 3, "offload_optimizer": "cpu", "offload_param": "cpu", "procs": 2, "precision": "bf16"},
            "DeepSpeed ZeRO-3 (offload optimizer->cpu, params->cpu), bf16, 2 x CUDA (DEEPSPEED)",
        ),
        (GPU, {"fsdp": True, "procs": 2, "precision": "fp16"}, "FSDP, fp16, 2 x CUDA (FSDP)"),
        (CPU, {"procs": 2, "precision": "no"}, "DDP, fp32, 2 x CPU (MULTI_CPU)"),
        (CPU, {"procs": 1, "precision": "bf16"}, "single process, bf16, 1 x CPU (NO)"),
        (CPU, {"zero": 2, "procs": 2, "precision": "no"}, "DeepSpeed ZeRO-2, fp32, 2 x CPU (DEEPSPEED)"),
    ],
)
def test_describe_names_strategy_precision_and_processes(hardware, arguments, first_line):
    assert plan(hardware, **arguments).describe().splitlines()[0] == first_line


# --- memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("hardware", [CPU, GPU], ids=["cpu", "gpu"])
def test_memory_rows_when_the_parameter_count_is_known(hardware):
    cfg = resolve_config(environ={}, arguments={"procs": 2})
    p = make_plan(cfg, hardware, total_params=350_000_000, largest_layer_params=50_000_000)
    assert p.memory and all(row.device_bytes >= 0 and row.host_bytes >= 0 for row in p.memory)
    assert {row.stage for row in p.memory} >= {None, 2, 3}
    assert p.recommendation is not None
    assert make_plan(cfg, hardware).memory == ()


@pytest.mark.parametrize("procs, omp, threads", [(1, None, 2), (2, None, 1), (3, None, 1), (1, "1", 1), (2, "4", 4)])
def test_cpu_workers_get_a_share_of_the_cores_or_the_users_omp_num_threads(monkeypatch, procs, omp, threads):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert plan(procs=procs).worker_env["OMP_NUM_THREADS"] == str(threads)
    assert "OMP_NUM_THREADS" not in plan(GPU, procs=min(procs, 2)).worker_env


@pytest.mark.parametrize(
    "content, cpus", [("200000 100000\n", 2.0), ("50000 100000", 0.5), ("max 100000", None), ("", None)]
)
def test_a_containers_cpu_quota_is_read_from_its_cgroup(tmp_path, content, cpus):
    from nexa_nb.hardware import cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text(content)
    assert cgroup_cpu_quota(str(tmp_path / "cpu.max")) == cpus
    assert cgroup_cpu_quota(str(tmp_path / "missing")) is None
