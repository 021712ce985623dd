"""The NER tutorial's task: all-MiniLM-L6-v2 tagging utility-engineering jargon.

`ner_task` turns the synthetic corpus of `nexa_nb.tutorials.ner_data` into a `nexa_nb.Task`:

- model: a factory, ``AutoModelForTokenClassification.from_pretrained(minilm_path(), ...)``
  with one output unit per BIO tag, built inside every worker (never in the kernel);
- train / eval data: lists of dicts of tensors (``input_ids``, ``attention_mask``,
  ``labels``), padded to ``max_length``; ``labels`` is -100 on sub-word continuations,
  special tokens and padding, so only the first sub-word of each word is scored;
- collate_fn: stacks the samples and cuts the padding columns that no row of the batch
  uses (sentences are ~20 tokens, so most of a 48-token row is padding: same result,
  about half the compute);
- metrics: entity-level F1 (seqeval) on the *whole* held-out split, from the model's
  predictions mapped back to words.

`heldout_f1(model, ...)` computes the same number for any model in the kernel (the
untrained baseline, or ``result.trained_model()``), and `predict_tags` tags new sentences.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Sequence

from nexa_nb.tutorials.minilm import load_tokenizer, minilm_path
from nexa_nb.tutorials.ner_data import (
    encode_for_token_classification,
    entity_f1,
    make_ner_corpus,
    word_tags,
)


class NerSetup(NamedTuple):
    """What `ner_task` returns: unpack it as ``task, label_names, heldout = ner_task()``."""

    task: object
    """The `nexa_nb.Task` to train."""
    label_names: list[str]
    """The BIO tags, "O" first, in the order of the classifier's output units."""
    heldout: list[dict]
    """The held-out examples (``{"tokens": [...], "tags": [...]}``) that `metrics` scores."""


def _quiet_transformers() -> None:
    """No weight-loading report or progress bar in the notebook (the head is new by design)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_model(label_names: Sequence[str]):
    """all-MiniLM-L6-v2 with a fresh token-classification head, one unit per tag."""
    from transformers import AutoModelForTokenClassification

    _quiet_transformers()
    names = list(label_names)
    return AutoModelForTokenClassification.from_pretrained(
        minilm_path(),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )


def model_factory(label_names: Sequence[str]):
    """A zero-argument, picklable factory for `build_model` (what `nexa_nb.Task` wants)."""
    return functools.partial(build_model, tuple(label_names))


def encode(examples, label_names, max_length: int = 48, tokenizer=None) -> list[dict]:
    """Examples -> a list of ``{"input_ids", "attention_mask", "labels"}`` dicts of 1-D tensors."""
    import torch

    # The kernel tokenizes, then forks the workers: a tokenizer thread pool must not exist then.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = tokenizer or load_tokenizer()
    rows = encode_for_token_classification(examples, tokenizer, label_names, max_length=max_length)
    return [{key: torch.tensor(value, dtype=torch.long) for key, value in row.items()} for row in rows]


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch and drop the padding columns that no row uses."""
    import torch

    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    used = int(batch["attention_mask"].sum(dim=1).max()) if "attention_mask" in batch else None
    if used:
        batch = {key: value[:, :used].contiguous() for key, value in batch.items()}
    return batch


def predict_ids(model, encoded: list[dict], batch_size: int = 64) -> list[list[int]]:
    """The argmax tag id of every token position of every encoded sequence (no gradients)."""
    import torch

    was_training = getattr(model, "training", False)
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = collate(encoded[start:start + batch_size])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                width = encoded[start]["input_ids"].shape[0]
                ids = logits.argmax(dim=-1).cpu()
                out += [row.tolist() + [0] * (width - len(row)) for row in ids]
    finally:
        if was_training:
            model.train()
    return out


def predicted_word_tags(model, examples, encoded, label_names, batch_size: int = 64) -> list[list[str]]:
    """One tag per word of each example; words cut off by ``max_length`` are tagged "O"."""
    labels = [row["labels"].tolist() for row in encoded]
    tags = word_tags(predict_ids(model, encoded, batch_size), labels, label_names)
    return [t + ["O"] * (len(ex["tokens"]) - len(t)) for t, ex in zip(tags, examples)]


def heldout_f1(model, examples, label_names, encoded=None, max_length: int = 48) -> float:
    """Entity-level F1 of `model` on `examples` (any model in the kernel: baseline or trained)."""
    encoded = encoded if encoded is not None else encode(examples, label_names, max_length)
    predicted = predicted_word_tags(model, examples, encoded, label_names)
    return entity_f1(predicted, [ex["tags"] for ex in examples])


class HeldoutF1:
    """The task's ``metrics``: ``{"f1": entity F1}`` on the whole held-out split.

    The engine hands each rank its shard of the eval loader (with samples repeated to even
    out the shards), and only rank 0's numbers are reported; so this metric predicts the
    whole held-out split on every rank instead (a few hundred short sentences, under a
    second or two), and every rank reports the same F1. Every rank running the same number
    of forwards also keeps ZeRO-3's weight gathering in step.
    """

    def __init__(self, examples, encoded, label_names):
        self.examples = list(examples)
        self.encoded = list(encoded)
        self.label_names = list(label_names)

    def __call__(self, model, eval_batches=None) -> dict[str, float]:
        predicted = predicted_word_tags(model, self.examples, self.encoded, self.label_names)
        return {"f1": entity_f1(predicted, [ex["tags"] for ex in self.examples])}


def ner_task(n_train: int = 1200, n_heldout: int = 300, seed: int = 0, max_length: int = 48) -> NerSetup:
    """The tutorial's task, its tag names and its held-out examples.

    The held-out split uses sentence templates and entity values that training never sees
    (see `nexa_nb.tutorials.ner_data`); it is both the task's ``eval_data`` (eval loss) and
    what ``metrics`` scores (entity F1).
    """
    import nexa_nb

    train, heldout, label_names = make_ner_corpus(n_train, n_heldout, seed=seed)
    tokenizer = load_tokenizer()
    train_encoded = encode(train, label_names, max_length, tokenizer)
    heldout_encoded = encode(heldout, label_names, max_length, tokenizer)
    task = nexa_nb.Task(
        model=model_factory(label_names),
        train_data=train_encoded,
        eval_data=heldout_encoded,
        collate_fn=collate,
        metrics=HeldoutF1(heldout, heldout_encoded, label_names),
        name="ner",
    )
    return NerSetup(task, label_names, heldout)


def predict_tags(model, sentences: Sequence[str], label_names, max_length: int = 48) -> list[list[tuple[str, str]]]:
    """Tag plain sentences (words split on spaces): one ``(word, tag)`` list per sentence."""
    examples = [{"tokens": s.split(), "tags": ["O"] * len(s.split())} for s in sentences]
    encoded = encode(examples, label_names, max_length)
    tags = predicted_word_tags(model, examples, encoded, label_names)
    return [list(zip(ex["tokens"], t)) for ex, t in zip(examples, tags)]


__all__ = ["NerSetup", "ner_task", "build_model", "model_factory", "encode", "collate", "heldout_f1",
           "predicted_word_tags", "predict_tags", "HeldoutF1"]
