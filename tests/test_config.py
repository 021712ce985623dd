"""Config layers, where each value came from, the environment variables, and every ConfigError."""

from __future__ import annotations

import json
import os

import pytest

from nexa_nb.config import ConfigError, resolve_config


def resolve(**layers):
    """`resolve_config` in an empty environment unless the test gives one."""
    layers.setdefault("environ", {})
    return resolve_config(**layers)


def raises_config_error(field: str, **layers) -> ConfigError:
    """Resolve, expect a ConfigError naming `field` with a fix, and return it."""
    with pytest.raises(ConfigError) as info:
        resolve(**layers)
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert err.fix and f"Fix: {err.fix}" in str(err)
    return err


# --- layering and sources ---------------------------------------------------------------


@pytest.fixture
def deepspeed_yaml(tmp_path):
    """An accelerate YAML (fp16, 2 processes) pointing at a DeepSpeed JSON (bf16, accumulation 2)."""
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 2, "bf16": {"enabled": True}}))
    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "distributed_type: DEEPSPEED\nmixed_precision: fp16\nnum_processes: 2\n"
        "deepspeed_config:\n  deepspeed_config_file: ds.json\n"
    )
    return path


def test_defaults_have_no_source():
    cfg = resolve()
    assert cfg.sources == {}
    assert cfg.source_of("batch_size") == "default"
    assert cfg.grad_accum == 1 and cfg.zero is None and cfg.precision == "no"


def test_deepspeed_json_overrides_the_accelerate_yaml(deepspeed_yaml):
    cfg = resolve(config_file=deepspeed_yaml)
    json_path = str(deepspeed_yaml.parent / "ds.json")
    assert (cfg.precision, cfg.source_of("precision")) == ("bf16", json_path)
    assert (cfg.procs, cfg.source_of("procs")) == (2, str(deepspeed_yaml))
    assert (cfg.grad_accum, cfg.source_of("grad_accum")) == (2, json_path)


@pytest.mark.parametrize(
    "layers, expected, source",
    [
        ({}, 2, "json"),
        ({"environ": {"GRADIENT_ACCUMULATION_STEPS": "3"}}, 3, "env:GRADIENT_ACCUMULATION_STEPS"),
        ({"environ": {"GRADIENT_ACCUMULATION_STEPS": "3"}, "session": {"grad_accum": 4}}, 4, "session"),
        (
            {
                "environ": {"GRADIENT_ACCUMULATION_STEPS": "3"},
                "session": {"grad_accum": 4},
                "arguments": {"grad_accum": 5},
            },
            5,
            "argument",
        ),
    ],
    ids=["json", "env", "session", "argument"],
)
def test_each_layer_overrides_the_one_before(deepspeed_yaml, layers, expected, source):
    cfg = resolve(config_file=deepspeed_yaml, **layers)
    assert cfg.grad_accum == expected
    assert cfg.source_of("grad_accum") == (str(deepspeed_yaml.parent / "ds.json") if source == "json" else source)
    assert cfg.source_of("procs") == str(deepspeed_yaml)  # fields no later layer sets keep their source
    assert cfg.source_of("seed") == "default"


def test_sources_name_every_layer(deepspeed_yaml):
    cfg = resolve(config_file=deepspeed_yaml, environ={"SEED": "7"}, session={"lr": 1e-4}, arguments={"batch_size": 4})
    assert dict(cfg.sources) == {
        "precision": str(deepspeed_yaml.parent / "ds.json"),
        "procs": str(deepspeed_yaml),
        "zero": str(deepspeed_yaml.parent / "ds.json"),
        "grad_accum": str(deepspeed_yaml.parent / "ds.json"),
        "seed": "env:SEED",
        "lr": "session",
        "batch_size": "argument",
    }


def test_os_environ_is_read_when_no_environ_is_given(monkeypatch):
    monkeypatch.setenv("SEED", "5")
    cfg = resolve_config()
    assert (cfg.seed, cfg.source_of("seed")) == (5, "env:SEED")


def test_target_batch_replaces_an_earlier_layers_accumulation(tmp_path):
    path = tmp_path / "zero2.yaml"
    path.write_text(
        "distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 1\n  zero_stage: 2\n"
    )
    cfg = resolve(config_file=path, arguments={"batch_size": 8, "target_batch": 64})
    assert cfg.target_batch == 64 and cfg.source_of("grad_accum") == str(path)


def test_later_accumulation_contradicting_a_target_batch_is_a_config_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}))
    raises_config_error("grad_accum", config_file=path, arguments={"grad_accum": 2})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("mixed_precision: 'no'\n", {"precision": "no"}),
        ("mixed_precision: no\n", {"precision": "no"}),  # unquoted, YAML reads false
        ("mixed_precision: BF16\n", {"precision": "bf16"}),
        ("mixed_precision: null\n", {}),
        ("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n", {"procs": 2, "force_cpu": True}),
        ("distributed_type: FSDP\nnum_processes: 4\n", {"fsdp": True, "procs": 4}),
        ("distributed_type: DEEPSPEED\n", {"zero": 2}),
        (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_optimizer_device: cpu\n"
            "  offload_param_device: cpu\n  gradient_accumulation_steps: 4\n  gradient_clipping: 0.5\n"
            "  zero3_save_16bit_model: true\n",
            {"zero": 3, "offload_optimizer": "cpu", "offload_param": "cpu", "grad_accum": 4, "clip_norm": 0.5},
        ),
        ("compute_environment: LOCAL_MACHINE\ngpu_ids: all\ntpu_vm: null\ndowncast_bf16: 'no'\n", {}),
    ],
)
def test_accelerate_yaml_maps_onto_fields(tmp_path, text, expected):
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    cfg = resolve(config_file=path)
    assert {name: getattr(cfg, name) for name in cfg.sources} == expected
    assert set(cfg.sources.values()) <= {str(path)}


@pytest.mark.parametrize(
    "deepspeed, expected",
    [
        ({}, {"zero": 0}),
        (
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "fp16": {"enabled": "auto"},
                "zero_optimization": {"stage": 2},
            },
            {"zero": 2},
        ),
        (
            {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4},
            {"target_batch": 16, "batch_size": 4, "grad_accum": 4, "zero": 0},
        ),
        ({"gradient_clipping": 0}, {"clip_norm": None, "zero": 0}),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": False}}, {"precision": "fp16", "zero": 0}),
        (
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "nvme", "nvme_path": "."},
                    "offload_param": {"device": "cpu"},
                }
            },
            {"zero": 3, "offload_optimizer": "nvme", "nvme_path": ".", "offload_param": "cpu"},
        ),
        (
            {
                "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
            },
            {"lr": 3e-4, "weight_decay": 0.01, "warmup_steps": 100, "zero": 0},
        ),
    ],
)
def test_deepspeed_json_maps_onto_fields(tmp_path, monkeypatch, deepspeed, expected):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(deepspeed))
    cfg = resolve(config_file=path)
    assert {name: getattr(cfg, name) for name in cfg.sources} == expected


@pytest.mark.parametrize(
    "environ, field, value, source",
    [
        ({"ACCELERATE_MIXED_PRECISION": "BF16"}, "precision", "bf16", "ACCELERATE_MIXED_PRECISION"),
        ({"GRADIENT_ACCUMULATION_STEPS": " 4 "}, "grad_accum", 4, "GRADIENT_ACCUMULATION_STEPS"),
        ({"FORCE_CPU": "true"}, "force_cpu", True, "FORCE_CPU"),
        ({"FORCE_CPU": "0"}, "force_cpu", False, "FORCE_CPU"),
        ({"USE_DEEPSPEED": "1"}, "zero", 2, "USE_DEEPSPEED"),
        ({"USE_DEEPSPEED": "yes", "DEEPSPEED_ZERO_STAGE": "3"}, "zero", 3, "USE_DEEPSPEED"),
        ({"USE_DEEPSPEED": "false", "DEEPSPEED_ZERO_STAGE": "3"}, "zero", None, "USE_DEEPSPEED"),
        ({"DEEPSPEED_ZERO_STAGE": "1"}, "zero", 1, "DEEPSPEED_ZERO_STAGE"),
        (
            {"USE_DEEPSPEED": "1", "DEEPSPEED_OFFLOAD_OPTIMIZER": "true"},
            "offload_optimizer",
            "cpu",
            "DEEPSPEED_OFFLOAD_OPTIMIZER",
        ),
        (
            {"USE_DEEPSPEED": "1", "DEEPSPEED_OFFLOAD_OPTIMIZER": "CPU"},
            "offload_optimizer",
            "cpu",
            "DEEPSPEED_OFFLOAD_OPTIMIZER",
        ),
        ({"DEEPSPEED_OFFLOAD_OPTIMIZER": "false"}, "offload_optimizer", "none", "DEEPSPEED_OFFLOAD_OPTIMIZER"),
        (
            {"DEEPSPEED_ZERO_STAGE": "3", "DEEPSPEED_OFFLOAD_PARAM": "cpu"},
            "offload_param",
            "cpu",
            "DEEPSPEED_OFFLOAD_PARAM",
        ),
        ({"ACCELERATE_GRADIENT_CHECKPOINTING": "on"}, "grad_ckpt", True, "ACCELERATE_GRADIENT_CHECKPOINTING"),
        ({"SEED": "7"}, "seed", 7, "SEED"),
    ],
)
def test_environment_variable_maps_onto_its_field(environ, field, value, source):
    cfg = resolve(environ=environ)
    assert getattr(cfg, field) == value
    assert cfg.source_of(field) == f"env:{source}"


def test_unrelated_environment_variables_are_ignored():
    assert resolve(environ={"HOME": "/home/x", "MIXED_PRECISION": "fp16", "ZERO_STAGE": "3"}).sources == {}


# --- errors from arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, field",
    [
        ({"zero": 2, "fsdp": True}, "fsdp"),
        ({"zero": 2, "offload_param": "cpu"}, "offload_param"),
        ({"offload_param": "cpu"}, "offload_param"),
        ({"offload_optimizer": "cpu"}, "offload_optimizer"),
        ({"zero": 0, "offload_optimizer": "cpu"}, "offload_optimizer"),
        ({"zero": 2, "offload_optimizer": "disk"}, "offload_optimizer"),
        ({"zero": 3, "offload_param": "gpu"}, "offload_param"),
        ({"zero": 4}, "zero"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"batch_size": 0}, "batch_size"),
        ({"procs": 0}, "procs"),
        ({"batch_size": 8, "procs": 2, "target_batch": 24}, "target_batch"),
        ({"batch_size": 8, "target_batch": 4}, "target_batch"),
        ({"batch_size": 8, "target_batch": 32, "grad_accum": 2}, "grad_accum"),
        ({"zero": 2, "offload_optimizer": "nvme"}, "nvme_path"),
        ({"zero": 3, "offload_param": "nvme", "nvme_path": "no/such/folder"}, "nvme_path"),
        ({"precision": "fp8"}, "precision"),
        ({"trackers": ["tensorboard", "comet"]}, "trackers"),
        ({"ckpt_every": 10}, "ckpt_every"),
        ({"ckpt_dir": "ckpts", "ckpt_every": 0}, "ckpt_every"),
        ({"resume": "latest"}, "resume"),
        ({"resume": "no/such/checkpoint"}, "resume"),
        ({"eval_every": 0}, "eval_every"),
        ({"epochs": 0}, "epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"lr": 0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"clip_norm": 0}, "clip_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"scheduler": "step"}, "scheduler"),
        ({"lr_scaling": "cube"}, "lr_scaling"),
        ({"lr_scaling": "linear", "lr_reference_batch": 0}, "lr_reference_batch"),
        ({"seed": -1}, "seed"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        # wrong types
        ({"batch_size": "8"}, "batch_size"),
        ({"batch_size": 8.5}, "batch_size"),
        ({"grad_accum": True}, "grad_accum"),
        ({"fsdp": "yes"}, "fsdp"),
        ({"lr": "fast"}, "lr"),
        ({"precision": 16}, "precision"),
        ({"trackers": 3}, "trackers"),
        ({"ckpt_dir": 3}, "ckpt_dir"),
        # not an option at all
        ({"batchsize": 8}, "batchsize"),
    ],
)
def test_bad_argument_is_a_config_error(tmp_path, monkeypatch, arguments, field):
    monkeypatch.chdir(tmp_path)  # relative paths above point into an empty folder
    raises_config_error(field, arguments=arguments)


def test_unknown_session_option_names_the_session():
    err = raises_config_error("batchsize", session={"batchsize": 8})
    assert "session" in err.problem


def test_ckpt_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    raises_config_error("ckpt_dir", arguments={"ckpt_dir": str(tmp_path / "file")})


def test_ckpt_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    raises_config_error("ckpt_dir", arguments={"ckpt_dir": str(tmp_path / "file" / "ckpts")})


@pytest.mark.parametrize(
    "arguments, field",
    [
        ({"ckpt_dir": "new/ckpts"}, "ckpt_dir"),
        ({"zero": 2, "offload_optimizer": "nvme", "nvme_path": "."}, "nvme_path"),
    ],
)
def test_unwritable_folder(tmp_path, monkeypatch, arguments, field):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if the folder were read-only (root ignores chmod)
    raises_config_error(field, arguments=arguments)


# --- errors from the environment --------------------------------------------------------


@pytest.mark.parametrize(
    "environ, field",
    [
        ({"GRADIENT_ACCUMULATION_STEPS": "four"}, "env GRADIENT_ACCUMULATION_STEPS"),
        ({"GRADIENT_ACCUMULATION_STEPS": "0"}, "grad_accum"),
        ({"FORCE_CPU": "maybe"}, "env FORCE_CPU"),
        ({"USE_DEEPSPEED": "sure"}, "env USE_DEEPSPEED"),
        ({"USE_DEEPSPEED": "1", "DEEPSPEED_ZERO_STAGE": "three"}, "env DEEPSPEED_ZERO_STAGE"),
        ({"DEEPSPEED_ZERO_STAGE": "three"}, "env DEEPSPEED_ZERO_STAGE"),
        ({"USE_DEEPSPEED": "1", "DEEPSPEED_ZERO_STAGE": "5"}, "zero"),
        ({"USE_DEEPSPEED": "1", "DEEPSPEED_OFFLOAD_OPTIMIZER": "disk"}, "offload_optimizer"),
        ({"DEEPSPEED_OFFLOAD_OPTIMIZER": "cpu"}, "offload_optimizer"),
        ({"USE_DEEPSPEED": "1", "DEEPSPEED_OFFLOAD_PARAM": "cpu"}, "offload_param"),
        ({"ACCELERATE_GRADIENT_CHECKPOINTING": "maybe"}, "env ACCELERATE_GRADIENT_CHECKPOINTING"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "precision"),
        ({"SEED": "x"}, "env SEED"),
        ({"SEED": "-1"}, "seed"),
    ],
)
def test_bad_environment_variable_is_a_config_error(environ, field):
    err = raises_config_error(field, environ=environ)
    assert any(name in str(err) for name in environ)  # says which variable to change


# --- errors from config files -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, field",
    [
        ("missing.yaml", None, "config"),
        ("settings.toml", "mixed_precision = 'bf16'", "config"),
        ("broken.yaml", "mixed_precision: [bf16", "config"),
        ("list.yaml", "- bf16\n- fp16\n", "config"),
        ("unknown.yaml", "distributed_typ: MULTI_CPU\n", "config"),
        ("ds_not_mapping.yaml", "distributed_type: DEEPSPEED\ndeepspeed_config: 2\n", "config"),
        ("procs_text.yaml", "num_processes: two\n", "procs"),
        ("bad_precision.yaml", "mixed_precision: fp8\n", "precision"),
        ("bad_stage.yaml", "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 4\n", "zero"),
        ("broken.json", '{"zero_optimization": {"stage": 2}', "config"),
        ("array.json", "[]", "config"),
        ("unknown.json", '{"zero": 2}', "config"),
        ("micro_text.json", '{"train_micro_batch_size_per_gpu": "8"}', "config"),
        ("clip_bool.json", '{"gradient_clipping": true}', "config"),
        ("fp16_bool.json", '{"fp16": true}', "config"),
        ("zero_number.json", '{"zero_optimization": 2}', "config"),
        ("offload_text.json", '{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}', "config"),
        (
            "offload_stage2.json",
            '{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}',
            "offload_param",
        ),
        ("not_utf8.json", b"\xff\xfe{}", "config"),
    ],
)
def test_bad_config_file_is_a_config_error(tmp_path, name, content, field):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    err = raises_config_error(field, config_file=path)
    assert name in str(err)  # says which file to fix


def test_fsdp_file_with_zero_argument_is_a_config_error(tmp_path):
    path = tmp_path / "fsdp.yaml"
    path.write_text("distributed_type: FSDP\n")
    raises_config_error("fsdp", config_file=path, arguments={"zero": 2})


def test_config_file_that_is_a_folder(tmp_path):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    raises_config_error("config", config_file=folder)


def test_yaml_pointing_at_a_missing_json(tmp_path):
    path = tmp_path / "accelerate.yaml"
    path.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: gone.json\n")
    err = raises_config_error("config", config_file=path)
    assert "gone.json" in err.problem


# --- resolving writes nothing -----------------------------------------------------------


def test_resolving_writes_nothing(tmp_path, monkeypatch, deepspeed_yaml):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    resolve(
        config_file=deepspeed_yaml,
        environ={"SEED": "1"},
        arguments={"ckpt_dir": "runs/a/ckpts", "ckpt_every": 5, "log_dir": "runs/logs", "trackers": ["tensorboard"]},
    )
    assert sorted(tmp_path.rglob("*")) == before
