"""The NER tutorial's task: all-MiniLM-L6-v2 tagging utility-engineering jargon.

`ner_task` turns the synthetic corpus of `nexa_tutorials.ner_data` into a `nexa_nb.Task`:

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
from collections.abc import Sequence
from typing import NamedTuple

from nexa_tutorials.minilm import load_tokenizer, minilm_path
from nexa_tutorials.ner_data import (
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
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")  # a worker's GPU, or the CPU
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = collate(encoded[start : start + batch_size])
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
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


SWAPPED_TYPES = ("EQUIPMENT", "MATERIAL", "ORG")
"""The closed-list entity types: a few dozen names each, none shared with the held-out split."""


def word_pool(tokenizer=None) -> list[str]:
    """Whole English-ish words from the tokenizer's vocabulary (alphabetic, 3+ letters)."""
    tokenizer = tokenizer or load_tokenizer()
    return sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) >= 3)


def swap_words(
    examples,
    entity_rate: float = 0.4,
    modifier_rate: float = 0.3,
    context_rate: float = 0.1,
    seed: int = 0,
    types: Sequence[str] = SWAPPED_TYPES,
    pool: Sequence[str] | None = None,
) -> list[dict]:
    """Training examples with some words replaced by random vocabulary words (augmentation).

    Each mention of a type in `types` is, with probability `entity_rate`, replaced by 1-3
    random words that keep the mention's tags (B- then I-), or else, with probability
    `modifier_rate`, keeps its last (head) word behind 1-2 new random modifiers ("crossarm"
    -> "<word> crossarm"). Each other alphabetic word tagged "O" is replaced, with
    probability `context_rate`, by one random word tagged "O".

    Why: the training split has only ~15 equipment names, ~10 materials and 9
    organisations, so a model fits it best by memorising them, and memorised names do not
    help with the held-out ones. With names swapped for random words it has to read the
    sentence around them; with new modifiers it learns that "double crossarm" is one
    entity, not "double" plus a known "crossarm"; swapping some context words keeps it
    from tagging every unfamiliar word as an entity. The held-out split is never augmented.
    """
    import random

    rng = random.Random(seed)
    pool = list(pool) if pool is not None else word_pool()

    def like(word: str, original: str) -> str:
        return word.capitalize() if original[:1].isupper() else word

    out = []
    for example in examples:
        words, tags = example["tokens"], example["tags"]
        new_words: list[str] = []
        new_tags: list[str] = []
        i = 0
        while i < len(words):
            tag = tags[i]
            if tag.startswith("B-"):
                end = i + 1
                while end < len(words) and tags[end] == "I-" + tag[2:]:
                    end += 1
                draw = rng.random()
                if tag[2:] in types and draw < entity_rate:
                    mention = [like(rng.choice(pool), words[i]) for _ in range(rng.randint(1, 3))]
                elif tag[2:] in types and draw < entity_rate + modifier_rate:
                    # The head word kept, its modifiers new: "crossarm" -> "xyz crossarm".
                    mention = [like(rng.choice(pool), words[i]) for _ in range(rng.randint(1, 2))] + [words[end - 1]]
                else:
                    mention = words[i:end]
                new_words += mention
                new_tags += [tag] + ["I-" + tag[2:]] * (len(mention) - 1)
                i = end
                continue
            word = words[i]
            if tag == "O" and word.isalpha() and rng.random() < context_rate:
                word = like(rng.choice(pool), word)
            new_words.append(word)
            new_tags.append(tag)
            i += 1
        out.append({"tokens": new_words, "tags": new_tags})
    return out


def ner_task(
    n_train: int = 3200,
    n_heldout: int = 300,
    seed: int = 0,
    max_length: int = 48,
    entity_swap: float = 0.4,
    modifier_swap: float = 0.3,
    context_swap: float = 0.1,
) -> NerSetup:
    """The tutorial's task, its tag names and its held-out examples.

    The held-out split uses sentence templates and entity values that training never sees
    (see `nexa_tutorials.ner_data`); it is both the task's ``eval_data`` (eval loss) and
    what ``metrics`` scores (entity F1). The training split is augmented by `swap_words`
    (all three rates 0: train on the generated sentences as they are).
    """
    import nexa_nb

    train, heldout, label_names = make_ner_corpus(n_train, n_heldout, seed=seed)
    tokenizer = load_tokenizer()
    if entity_swap or modifier_swap or context_swap:
        train = swap_words(train, entity_swap, modifier_swap, context_swap, seed=seed, pool=word_pool(tokenizer))
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


def bracketed(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """A sentence with each entity written as ``[words](TYPE)``, e.g. for printing predictions."""
    parts: list[str] = []
    open_kind = None
    for word, tag in zip(tokens, tags):
        starts = tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != open_kind)
        if open_kind is not None and (tag == "O" or starts):
            parts[-1] += f"]({open_kind})"
            open_kind = None
        if starts:
            parts.append("[" + word)
            open_kind = tag[2:]
        else:
            parts.append(word)
    if open_kind is not None:
        parts[-1] += f"]({open_kind})"
    return " ".join(parts)


__all__ = [
    "bracketed",
    "NerSetup",
    "ner_task",
    "swap_words",
    "word_pool",
    "build_model",
    "model_factory",
    "encode",
    "collate",
    "heldout_f1",
    "predicted_word_tags",
    "predict_tags",
    "HeldoutF1",
]
