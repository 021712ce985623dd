"""Hugging Face data as users bring it: transformers' collators, ``datasets.Dataset`` (raw rows and
``with_format("torch")``), ``BatchEncoding``, dataclass and named-tuple batches.

Real transformers, datasets, Accelerate and DeepSpeed; the models are tiny ones built from configs
and the tokenizer is trained in code on the test's own words, so nothing is downloaded.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections import UserDict, defaultdict

import datasets
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import nexa_nb
from nexa_nb import events as ev
from nexa_nb.api import prepare
from nexa_nb.config import resolve_config
from nexa_nb.engine.batches import batch_problem, cast_floats, count_tokens, default_forward, placing_collate
from nexa_nb.errors import TrainingError

WORDS = "the a cat dog bird sat ran flew on in over mat park sea today red big small".split()


@functools.cache
def tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, with BERT's special tokens."""
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def sentences(n: int = 64) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (3 + i % 5,), generator=g).tolist()) for i in range(n)]


def bert(kind=tf.BertForSequenceClassification, num_labels: int = 2) -> torch.nn.Module:
    config = tf.BertConfig(
        vocab_size=tokenizer().vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return kind(config)


def gpt2() -> torch.nn.Module:
    config = tf.GPT2Config(vocab_size=tokenizer().vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=256)
    return tf.GPT2LMHeadModel(config)


def t5() -> torch.nn.Module:
    config = tf.T5Config(
        vocab_size=tokenizer().vocab_size,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    return tf.T5ForConditionalGeneration(config)


def classification_dataset(n: int = 64, **padding) -> datasets.Dataset:
    """Raw rows as a datasets user has them after tokenizing: lists of ids and a label, text dropped."""
    text = sentences(n)
    raw = datasets.Dataset.from_dict({"text": text, "label": [int("cat" in s) for s in text]})
    return raw.map(lambda row: tokenizer()(row["text"], **padding), remove_columns=["text"])


def padded_dataset(n: int = 64, labels: str = "labels") -> datasets.Dataset:
    """Fixed-length rows as torch tensors: default_collate stacks them, no collator needed."""
    padded = classification_dataset(n, padding="max_length", max_length=8, truncation=True)
    return (padded if labels == "label" else padded.rename_column("label", labels)).with_format("torch")


def head(data, n: int):
    """The first `n` samples, as a dataset of the same kind (slicing a datasets.Dataset gives columns)."""
    return data.select(range(n)) if isinstance(data, datasets.Dataset) else data[:n]


def token_rows() -> list[dict]:
    rows = [dict(tokenizer()(s)) for s in sentences()]
    return [{**row, "labels": [i % 3 for i in row["input_ids"]]} for row in rows]


def seq2seq_rows() -> list[dict]:
    rows = [dict(tokenizer()(s)) for s in sentences()]
    return [{**row, "labels": row["input_ids"][:2]} for row in rows]


def causal_rows() -> list[dict]:
    return [{"input_ids": tokenizer()(s)["input_ids"]} for s in sentences()]


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def check_in_kernel(task: nexa_nb.Task) -> None:
    """The checks before any worker starts: the first batch, and one forward when the model is a module."""
    prepare(task, resolve_config(environ={}, arguments={"batch_size": 4, "max_steps": 2}))


# --- batches of every type, in the kernel --------------------------------------------------


def test_a_batch_encoding_passes_preflight_forward_casting_and_counting():
    collator = tf.DataCollatorWithPadding(tokenizer())
    rows = list(classification_dataset(8))
    batch = collator(rows[:4])
    assert isinstance(batch, tf.BatchEncoding) and not isinstance(batch, dict)

    model = bert()
    assert default_forward(model, batch).loss.dim() == 0
    batch["scale"] = torch.ones(4)
    cast = cast_floats(batch, torch.bfloat16)
    assert isinstance(cast, tf.BatchEncoding) and cast.scale.dtype == torch.bfloat16
    assert cast["input_ids"].dtype == torch.long
    assert count_tokens(batch) == int(batch["attention_mask"].sum())
    check_in_kernel(nexa_nb.Task(model, rows, collate_fn=collator))  # with one forward, since the model is a module


def test_other_mappings_are_cast_as_their_own_type_when_they_can_be():
    user = cast_floats(UserDict(x=torch.ones(2)), torch.float16)
    assert type(user) is UserDict and user["x"].dtype == torch.float16
    plain = cast_floats(defaultdict(list, x=torch.ones(2)), torch.float16)  # defaultdict(dict) is no defaultdict
    assert plain == {"x": plain["x"]} and plain["x"].dtype == torch.float16


@dataclasses.dataclass(frozen=True)
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor | None = None
    size: int = dataclasses.field(init=False, default=0)


def dataclass_collate(samples: list[dict]) -> TextBatch:
    batch = tf.DataCollatorWithPadding(tokenizer())(samples)
    return TextBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], weight=torch.ones(len(samples)))


class Weighted(torch.nn.Module):
    """A BERT classifier that also takes the dataclass's weight: every field arrives by name."""

    def __init__(self):
        super().__init__()
        self.bert = bert()

    def forward(self, input_ids, attention_mask, labels, weight, size):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss * weight.mean()


def test_a_dataclass_batch_is_called_by_field_cast_counted_and_placed():
    batch = dataclass_collate(list(classification_dataset(4)))
    assert default_forward(Weighted(), batch).dim() == 0

    cast = cast_floats(batch, torch.bfloat16)
    assert type(cast) is TextBatch and cast.weight.dtype == torch.bfloat16 and cast.input_ids.dtype == torch.long
    assert count_tokens(batch) == int(batch.attention_mask.sum())
    assert batch_problem(batch) is None

    placed = placing_collate(dataclass_collate, torch.device("meta"))(list(classification_dataset(4)))
    assert type(placed) is TextBatch and {placed.input_ids.device.type, placed.weight.device.type} == {"meta"}
    mapping = placing_collate(tf.DataCollatorWithPadding(tokenizer()), torch.device("meta"))
    assert mapping(list(classification_dataset(4)))["input_ids"].device.type == "cpu"  # Accelerate's job

    check_in_kernel(nexa_nb.Task(Weighted(), classification_dataset(), collate_fn=dataclass_collate))


Pair = collections.namedtuple("Pair", "inputs target")
Named = collections.namedtuple("Named", "input_ids attention_mask labels")


def named_collate(samples: list[dict]) -> Named:
    batch = tf.DataCollatorWithPadding(tokenizer())(samples)
    return Named(batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_a_named_tuple_batch_is_a_tuple_called_in_order_and_keeps_its_type():
    model = torch.nn.Linear(3, 1)
    batch = Pair(torch.ones(4, 3), torch.zeros(4, 1))
    assert default_forward(model, batch).shape == (4, 1)
    cast = cast_floats(batch, torch.bfloat16)
    assert type(cast) is Pair and cast.inputs.dtype == torch.bfloat16
    assert count_tokens(batch) is None
    mse = lambda out, b: torch.nn.functional.mse_loss(out, b.target)  # noqa: E731
    check_in_kernel(nexa_nb.Task(model, [Pair(torch.ones(3), torch.zeros(1))] * 8, loss_fn=mse))

    named = named_collate(list(classification_dataset(4)))
    assert count_tokens(named) == int(named.attention_mask.sum())
    task = nexa_nb.Task(bert(), classification_dataset(), collate_fn=named_collate)
    with pytest.raises(TrainingError, match=r"without its last field 'labels'.*model\(\*\*batch._asdict\(\)\)"):
        check_in_kernel(task)
    by_name = dataclasses.replace(task, forward=lambda model, batch: model(**batch._asdict()))
    check_in_kernel(by_name)


def test_a_batch_the_model_cannot_take_names_the_field_and_the_fixes():
    rows = padded_dataset(8).map(lambda row: {"text": "a sentence"})
    with pytest.raises(TrainingError) as caught:
        check_in_kernel(nexa_nb.Task(bert, rows))
    message = str(caught.value)
    assert "batch['text'] is a list of str" in message
    assert "pass Task(collate_fn=...)" in message and "pass Task(forward=...)" in message

    assert batch_problem([{"input_ids": [1, 2]}]) == "batch is a list of dict holding no tensor"
    flattened = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(causal_rows()[:4])
    assert batch_problem(flattened) is None  # its max_length_q/k are ints beside the tensors

    def own_forward(model, batch):
        return model(**tokenizer()(batch["text"], return_tensors="pt", padding=True), labels=batch["labels"])

    texts = [{"text": s, "labels": i % 2} for i, s in enumerate(sentences(8))]
    check_in_kernel(nexa_nb.Task(bert(), texts, forward=own_forward))  # a forward of its own takes any batch


def test_a_label_column_the_model_does_not_take_is_named_with_the_fix():
    with pytest.raises(TrainingError, match=r"dataset.rename_column\('label', 'labels'\)"):
        check_in_kernel(nexa_nb.Task(bert(), padded_dataset(8, labels="label")))
    check_in_kernel(nexa_nb.Task(bert(), padded_dataset(8, labels="label"), collate_fn=tf.default_data_collator))


def test_text_left_in_the_samples_is_named_when_collating_fails():
    text = sentences(8)
    rows = datasets.Dataset.from_dict({"text": text}).map(lambda row: tokenizer()(row["text"]))
    with pytest.raises(
        TrainingError, match=r"with text in 'text' \(drop it, e.g. dataset.remove_columns\(\['text'\]\)"
    ):
        check_in_kernel(nexa_nb.Task(bert, rows, collate_fn=tf.DataCollatorWithPadding(tokenizer())))


# --- real runs ----------------------------------------------------------------------------

COLLATOR_RUNS = {
    "padding": (bert, classification_dataset, lambda: tf.DataCollatorWithPadding(tokenizer())),
    "token-classification": (
        functools.partial(bert, tf.BertForTokenClassification, 3),
        token_rows,
        lambda: tf.DataCollatorForTokenClassification(tokenizer()),
    ),
    "causal-lm": (gpt2, causal_rows, lambda: tf.DataCollatorForLanguageModeling(tokenizer(), mlm=False)),
    "seq2seq": (t5, seq2seq_rows, lambda: tf.DataCollatorForSeq2Seq(tokenizer())),
    "flattening": (gpt2, causal_rows, tf.DataCollatorWithFlattening),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, zero, precision",
    [
        ("padding", None, "no"),
        ("padding", 3, "no"),
        ("token-classification", None, "no"),
        ("token-classification", 2, "no"),
        ("causal-lm", None, "no"),
        ("causal-lm", 3, "bf16"),
        ("seq2seq", None, "no"),
        ("seq2seq", 2, "no"),
        ("flattening", None, "no"),
        ("flattening", 2, "bf16"),
    ],
)
def test_a_transformers_collator_trains_in_two_processes(quiet, name, zero, precision):
    model, rows, collator = COLLATOR_RUNS[name]
    data = rows()
    task = nexa_nb.Task(model, data, eval_data=head(data, 16), collate_fn=collator(), name=name)
    result = nexa_nb.train(
        task, sinks=[quiet], procs=2, zero=zero, precision=precision, batch_size=4, max_steps=8, lr=2e-2
    )

    assert result.status == "completed" and len(result.losses) == 8
    assert result.distributed_type == ("MULTI_CPU" if zero is None else "DEEPSPEED") and result.num_processes == 2
    assert falls(result.losses), result.losses
    assert result.eval_metrics["loss"] > 0
    assert all(e.tokens_per_s for e in quiet.events if isinstance(e, ev.StepEnd))


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_a_torch_formatted_dataset_trains_and_evaluates(quiet, procs):
    data = padded_dataset()
    assert isinstance(data[0]["input_ids"], torch.Tensor)
    task = nexa_nb.Task(bert, data, eval_data=padded_dataset(16))
    result = nexa_nb.train(task, sinks=[quiet], procs=procs, batch_size=4, max_steps=8, lr=2e-2)

    assert result.num_processes == procs and falls(result.losses), result.losses
    assert result.eval_metrics["loss"] > 0


@pytest.mark.slow
def test_a_dataclass_batch_from_a_raw_dataset_trains_under_deepspeed_bf16(quiet):
    data = classification_dataset()
    task = nexa_nb.Task(Weighted, data, eval_data=head(data, 16), collate_fn=dataclass_collate)
    result = nexa_nb.train(task, sinks=[quiet], zero=2, precision="bf16", batch_size=4, max_steps=8, lr=2e-2)

    assert result.distributed_type == "DEEPSPEED" and falls(result.losses), result.losses
    assert result.eval_metrics["loss"] > 0
    assert all(e.tokens_per_s for e in quiet.events if isinstance(e, ev.StepEnd))
