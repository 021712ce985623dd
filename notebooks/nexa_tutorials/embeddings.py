"""A `nexa_nb.Task` that fine-tunes all-MiniLM-L6-v2 for retrieval with in-batch negatives.

The model is the plain transformers encoder of the checkpoint followed by mean pooling over
the real (non-padding) tokens and L2 normalisation: exactly what
``SentenceTransformer(minilm_path()).encode`` computes for this checkpoint (its modules are
Transformer -> Pooling(mean) -> Normalize), without importing sentence-transformers in the
kernel and in every worker (on the development machines that import alone takes about
three times as long as transformers' and adds some 200 MB to each process), and with a
state dict that is the encoder's own, so ``result.trained_model()`` needs nothing else.

Training data are ``(requirement, clause)`` pairs. The loss is MultipleNegativesRanking
(in-batch negatives): within one micro-batch, requirement i must pick its own clause among
all the micro-batch's clauses; cross-entropy over ``scale`` x the cosine-similarity matrix.

Duplicate clauses. The synthetic training pairs are drawn with replacement from fewer than
a hundred clauses, so a micro-batch of 32 holds the same clause twice most of the time, and
plain MNRL would then push a requirement *away* from a copy of its own right answer. The
engine shuffles with its own seeded sampler, so no ordering of the dataset can prevent
that. Instead the collate function de-duplicates: it tokenizes each distinct clause of the
micro-batch once and gives every requirement the index of its clause among them
(``labels``). The loss is then MNRL over the distinct clauses, which is the same as masking
the duplicate columns, costs fewer clause encodings, and leaves no false negative.

`metrics` ranks every held-out requirement against *all* held-out clauses (not only those
of one evaluation micro-batch) and reports ``accuracy@1``. It uses the full held-out lists
it was built with rather than the (per-rank sharded) evaluation batches, so every rank
runs the same forwards (ZeRO-3 needs that) and the score does not depend on the number
of processes. `heldout_accuracy` is the same computation for a model in the kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nexa_nb.task import Task
from nexa_tutorials.embedding_data import heldout_clauses, retrieval_accuracy_at_1
from nexa_tutorials.minilm import minilm_path

Pair = tuple[str, str]


# --- model ------------------------------------------------------------------------------


class MeanPoolEncoder(nn.Module):
    """A transformers encoder + mean pooling + L2 normalisation: one unit vector per text.

    ``model(input_ids, attention_mask)`` embeds one set of texts;
    ``model(input_ids, attention_mask, doc_input_ids, doc_attention_mask)`` embeds queries
    and documents in one call (what the training forward uses, so that a DDP or DeepSpeed
    wrapper sees one forward per micro-batch) and returns ``{"query": ..., "doc": ...}``.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, input_ids, attention_mask, doc_input_ids=None, doc_attention_mask=None):
        queries = self.embed(input_ids, attention_mask)
        if doc_input_ids is None:
            return queries
        return {"query": queries, "doc": self.embed(doc_input_ids, doc_attention_mask)}


def build_encoder(freeze_embeddings: bool = False) -> MeanPoolEncoder:
    """all-MiniLM-L6-v2 as a `MeanPoolEncoder` (the model factory of `make_task`).

    ``freeze_embeddings=True`` keeps the token-embedding table (11.7M of the 22.7M
    parameters) fixed: the optimizer then holds half the state and steps faster on a CPU,
    and the table's rows for words the training pairs never use stay as they were.
    """
    from transformers import AutoModel
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # no load report or progress bar from every worker
    logging.disable_progress_bar()
    try:
        # No pooler: its weights would get no gradient (mean pooling replaces it), and DDP
        # refuses parameters that get none.
        encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if freeze_embeddings:
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return MeanPoolEncoder(encoder).eval()  # in eval mode, as from_pretrained leaves a model; training sets train()


def load_tokenizer():
    """The checkpoint's fast tokenizer; its thread pool off, since workers are forked from the kernel."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


# --- data -----------------------------------------------------------------------------


class PairCollator:
    """A list of ``(requirement, clause)`` pairs -> one batch dict of tensors.

    ``input_ids`` / ``attention_mask``: the requirements (queries), one row each;
    ``doc_input_ids`` / ``doc_attention_mask``: the *distinct* clauses, in order of first
    appearance; ``labels[i]``: the row of requirement i's clause among them. Padding is to
    the longest text of the micro-batch, truncation at ``max_length`` tokens.
    """

    def __init__(self, tokenizer=None, max_length: int = 48):
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.max_length = max_length

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        queries = [q for q, _ in pairs]
        distinct: dict[str, int] = {}
        labels = [distinct.setdefault(clause, len(distinct)) for _, clause in pairs]
        q, d = self.tokenize(queries), self.tokenize(list(distinct))
        return {
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "doc_input_ids": d["input_ids"],
            "doc_attention_mask": d["attention_mask"],
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def pair_forward(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The task's forward: both embeddings from one call of the (possibly wrapped) model."""
    return model(batch["input_ids"], batch["attention_mask"], batch["doc_input_ids"], batch["doc_attention_mask"])


# --- loss -------------------------------------------------------------------------------


def in_batch_negatives_loss(
    query: torch.Tensor, doc: torch.Tensor, labels: torch.Tensor | None = None, scale: float = 20.0
) -> torch.Tensor:
    """MultipleNegativesRankingLoss: cross-entropy over ``scale`` x cos(query_i, doc_j).

    Row i's right answer is ``doc[labels[i]]`` (default: ``doc[i]``); every other row of
    `doc` is a negative. `scale` is the inverse temperature (20, as sentence-transformers).
    """
    query, doc = F.normalize(query.float(), dim=-1), F.normalize(doc.float(), dim=-1)
    if labels is None:
        labels = torch.arange(len(query), device=query.device)
    return F.cross_entropy(scale * query @ doc.T, labels.to(query.device))


class MNRLoss:
    """``loss_fn(outputs, batch)`` for the engine: `in_batch_negatives_loss` at a fixed scale."""

    def __init__(self, scale: float = 20.0):
        self.scale = scale

    def __call__(self, outputs, batch) -> torch.Tensor:
        return in_batch_negatives_loss(outputs["query"], outputs["doc"], batch["labels"], self.scale)


# --- metric -----------------------------------------------------------------------------


def candidate_clauses(heldout: Sequence[Pair]) -> list[str]:
    """The held-out pairs' clauses (in pair order) followed by every other held-out clause."""
    own = [clause for _, clause in heldout]
    taken = set(own)
    return own + [clause for clause in heldout_clauses() if clause not in taken]


@torch.no_grad()
def encode(model, collator: PairCollator, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings of `texts` (on the CPU), in chunks, through ``model(input_ids, attention_mask)``.

    The model runs in eval mode (no dropout) and is put back in the mode it was in.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            tokens = collator.tokenize(texts[start : start + batch_size])
            chunks.append(model(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _device_of(model) -> torch.device:
    """Where the model computes: a DeepSpeed engine says so itself (under ZeRO-3 with parameter
    offload its parameters live on the CPU while it computes on the GPU); else its parameters' device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def heldout_accuracy(model, collator: PairCollator, heldout: Sequence[Pair], batch_size: int = 64) -> float:
    """Accuracy@1 of the held-out requirements against all held-out clauses (in eval mode)."""
    queries = encode(model, collator, [q for q, _ in heldout], batch_size)
    clauses = encode(model, collator, candidate_clauses(heldout), batch_size)
    return retrieval_accuracy_at_1(queries, clauses)


class RetrievalMetrics:
    """``metrics(model, eval_batches)``: ``{"accuracy@1": ...}`` over the full held-out lists."""

    def __init__(self, heldout: Sequence[Pair], collator: PairCollator, batch_size: int = 64):
        self.heldout, self.collator, self.batch_size = list(heldout), collator, batch_size

    def __call__(self, model, eval_batches=None) -> dict[str, float]:
        return {"accuracy@1": heldout_accuracy(model, self.collator, self.heldout, self.batch_size)}


# --- the task ---------------------------------------------------------------------------


def make_task(
    train_pairs: Sequence[Pair],
    heldout_pairs: Sequence[Pair],
    *,
    max_length: int = 48,
    scale: float = 20.0,
    freeze_embeddings: bool = False,
    tokenizer=None,
    eval_batch_size: int = 64,
) -> Task:
    """The retrieval fine-tuning task: MiniLM built in each worker, MNRL loss, accuracy@1.

    ``eval_data`` is the held-out pairs (the engine reports their in-batch loss as
    ``eval_metrics["loss"]``); ``eval_metrics["accuracy@1"]`` ranks them against all
    held-out clauses.
    """
    collator = PairCollator(tokenizer, max_length)
    return Task(
        model=functools.partial(build_encoder, freeze_embeddings=freeze_embeddings),
        train_data=list(train_pairs),
        eval_data=list(heldout_pairs),
        collate_fn=collator,
        loss_fn=MNRLoss(scale),
        metrics=RetrievalMetrics(heldout_pairs, collator, eval_batch_size),
        forward=pair_forward,
        name="minilm-retrieval",
    )


__all__ = [
    "MeanPoolEncoder",
    "build_encoder",
    "load_tokenizer",
    "PairCollator",
    "pair_forward",
    "in_batch_negatives_loss",
    "MNRLoss",
    "candidate_clauses",
    "encode",
    "heldout_accuracy",
    "RetrievalMetrics",
    "make_task",
]
