"""The trained model goes to disk from the workers, never through the kernel.

Every run here is real (transformers, peft, Accelerate, DeepSpeed on CPU processes). "The
weights the run ended with" come from somewhere else than the output folder: the final
checkpoint, which Accelerate or DeepSpeed write by their own means (DeepSpeed's checkpoint is
read back with its own ``zero_to_fp32``). Loaded into a model built here, it must give the logits
of the model loaded from ``model_dir``. That fails if the folder holds the initial weights (the
logits are also checked to differ from an untrained model's), one rank's shard instead of the
gathered weights, another dtype, or adapters over another base model.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import nexa_nb
from nexa_nb.config import ConfigError
from nexa_nb.errors import TrainingError
from tests.conftest import regression_task

GPT2_SHAPE = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)
LORA = dict(lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"])


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(**GPT2_SHAPE)


def make_gpt2():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config())


def gpt2_task(tokenizer=None) -> nexa_nb.Task:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, GPT2_SHAPE["vocab_size"], (64, 16), generator=g)
    return nexa_nb.Task(make_gpt2, [{"input_ids": i, "labels": i} for i in ids], name="gpt2", tokenizer=tokenizer)


def word_tokenizer():
    """A real transformers tokenizer, built here: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, GPT2_SHAPE["vocab_size"])}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")


PROBE = torch.randint(0, GPT2_SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def checkpoint_state(result) -> dict[str, torch.Tensor]:
    """The final checkpoint's model weights, read by Accelerate's or DeepSpeed's own format."""
    path = result.checkpoint_dir
    if result.distributed_type == "DEEPSPEED":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path, tag="pytorch_model")
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def load_into(model, state: dict) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "base_model.model.lm_head.weight"}  # tied
    return model


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(procs=1), id="plain"),
        pytest.param(dict(procs=2, zero=2), id="zero2-2procs", marks=pytest.mark.slow),
        pytest.param(dict(procs=2, zero=3), id="zero3-2procs", marks=pytest.mark.slow),
    ],
)
def test_a_transformers_model_loads_with_from_pretrained_as_it_ended(options, tmp_path, quiet):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    result = nexa_nb.train(
        gpt2_task(word_tokenizer()),
        sinks=[quiet],
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        ckpt_dir=str(tmp_path),
        **options,
    )

    assert result.model_dir == str(tmp_path / "final")  # the default beside the checkpoints
    loaded = GPT2LMHeadModel.from_pretrained(result.model_dir)
    assert next(loaded.parameters()).dtype == torch.float32  # an fp32 run writes fp32
    ended = load_into(make_gpt2(), checkpoint_state(result))
    torch.testing.assert_close(logits(loaded), logits(ended), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(loaded), logits(make_gpt2()), atol=1e-3)  # training changed it
    torch.testing.assert_close(logits(result.trained_model()), logits(ended), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(result.model_dir)("t5 t7")["input_ids"] == [5, 7]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(procs=1), id="plain"),
        pytest.param(dict(procs=2, zero=3), id="zero3-2procs", marks=pytest.mark.slow),
    ],
)
def test_lora_writes_the_adapter_and_the_merged_model(options, tmp_path, quiet):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import GPT2LMHeadModel

    result = nexa_nb.train(
        gpt2_task(),
        sinks=[quiet],
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        ckpt_dir=str(tmp_path),
        merge_lora=True,
        **LORA,
        **options,
    )

    folder = result.model_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "merged"} <= set(os.listdir(folder))
    # The checkpoint holds base and adapters; the base is the one the seed drew in the workers.
    torch.manual_seed(nexa_nb.TrainConfig().seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type=TaskType.CAUSAL_LM)
    ended = load_into(get_peft_model(make_gpt2(), lora), checkpoint_state(result))
    expected = logits(ended)
    with ended.disable_adapter():
        assert not torch.allclose(expected, logits(ended), atol=1e-4)  # the adapters learned something

    torch.manual_seed(nexa_nb.TrainConfig().seed)
    adapter = PeftModel.from_pretrained(make_gpt2(), folder)
    torch.testing.assert_close(logits(adapter), expected, rtol=1e-5, atol=1e-5)
    merged = GPT2LMHeadModel.from_pretrained(os.path.join(folder, "merged"))
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(result.trained_model()), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(result.trained_model(merge=False)), expected, rtol=1e-5, atol=1e-5)


def test_lora_without_merge_loads_over_the_seeded_base(tmp_path, quiet):
    """Without merge_lora the folder holds the adapter only; trained_model rebuilds the random base."""
    result = nexa_nb.train(
        gpt2_task(), sinks=[quiet], max_steps=3, batch_size=4, lr=1e-2, ckpt_dir=str(tmp_path), **LORA
    )

    assert "merged" not in os.listdir(result.model_dir)
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(nexa_nb.TrainConfig().seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type=TaskType.CAUSAL_LM)
    ended = load_into(get_peft_model(make_gpt2(), lora), checkpoint_state(result))
    torch.testing.assert_close(logits(result.trained_model()), logits(ended), rtol=1e-5, atol=1e-5)


def test_a_plain_module_is_written_as_safetensors(tmp_path, quiet):
    from safetensors.torch import load_file

    out = tmp_path / "model"
    result = nexa_nb.train(
        regression_task(), sinks=[quiet], max_steps=5, lr=0.02, ckpt_dir=str(tmp_path / "ck"), output_dir=str(out)
    )

    assert result.model_dir == str(out)
    assert sorted(os.listdir(out)) == ["model.safetensors", "nexa_model.json"]
    written, ended = load_file(str(out / "model.safetensors")), checkpoint_state(result)
    assert written.keys() == ended.keys()
    assert all(torch.equal(written[k], ended[k]) for k in written)
    model = result.trained_model()  # a fresh model from the task's factory with those weights
    assert all(torch.equal(model.state_dict()[k], ended[k]) for k in ended)


def test_the_kernel_receives_no_weights(tmp_path, quiet):
    """Rank 0's outcome, as it crossed the queue, holds no tensor: a few KiB of history and names."""
    from nexa_nb.api import prepare
    from nexa_nb.config import resolve_config
    from nexa_nb.launch import launch

    task = gpt2_task()
    plan = prepare(
        task, resolve_config(environ={}, arguments=dict(max_steps=2, batch_size=4, output_dir=str(tmp_path / "m")))
    )
    outcome = launch(plan, task, [quiet])

    assert outcome.model_dir == plan.output_dir and os.path.isdir(plan.output_dir)
    params = sum(p.numel() for p in make_gpt2().parameters())
    assert len(pickle.dumps(outcome)) < 10_000 < 4 * params
    assert not any(isinstance(v, torch.Tensor) for v in vars(outcome).values())


# --- bad input: one line, before any worker starts, nothing written -------------------------


def test_merge_lora_without_lora_is_refused(tmp_path, quiet):
    with pytest.raises(ConfigError) as info:
        nexa_nb.train(regression_task(), sinks=[quiet], merge_lora=True, output_dir=str(tmp_path / "out"))
    assert "--lora" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, quiet):
    target = tmp_path / "model.bin"
    target.write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder") as info:
        nexa_nb.train(regression_task(), sinks=[quiet], output_dir=str(target))
    assert "\n" not in str(info.value) and target.read_text() == "mine"


def test_an_output_dir_holding_other_files_is_refused(tmp_path, quiet):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="holds other files") as info:
        nexa_nb.train(regression_task(), sinks=[quiet], output_dir=str(tmp_path))
    assert "\n" not in str(info.value) and os.listdir(tmp_path) == ["notes.txt"]


def test_a_tokenizer_without_save_pretrained_is_refused(tmp_path, quiet):
    task = regression_task()
    task.tokenizer = str.split
    with pytest.raises(TrainingError, match="no save_pretrained") as info:
        nexa_nb.train(task, sinks=[quiet], output_dir=str(tmp_path / "out"))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
