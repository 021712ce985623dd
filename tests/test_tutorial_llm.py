"""The language-model tutorial's helpers: a stable text, the tokenizer, blocks, streams, perplexity, a short run."""

from __future__ import annotations

import ast
import math
import sys

import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from nexa_tutorials import llm  # noqa: E402

# The releases whose files were compared when the module list was made (see llm.SOURCE_SHA256).
CHECKED_RELEASES = {(3, 10), (3, 11), (3, 12), (3, 13)}


@pytest.fixture(scope="module")
def corpus():
    return llm.collect_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return llm.train_tokenizer(corpus.code_train, vocab_size=512)


def test_the_module_lists_are_sorted_disjoint_and_hashed():
    assert list(llm.TRAIN_MODULES) == sorted(llm.TRAIN_MODULES)
    assert list(llm.HELDOUT_MODULES) == sorted(llm.HELDOUT_MODULES)
    assert not set(llm.TRAIN_MODULES) & set(llm.HELDOUT_MODULES)
    assert set(llm.SOURCE_SHA256) == set(llm.TRAIN_MODULES) | set(llm.HELDOUT_MODULES)


@pytest.mark.skipif(sys.version_info[:2] not in CHECKED_RELEASES, reason="the files were compared in 3.10-3.13")
def test_this_python_has_the_same_files_and_so_the_same_text(corpus):
    for module, digest in llm.SOURCE_SHA256.items():
        assert llm.source_sha256(llm.read_source(module)) == digest, f"{module} differs in this Python"
    assert corpus.digest == llm.CORPUS_DIGEST


def test_the_two_styles_are_separate_and_the_code_still_parses(corpus):
    assert len(corpus.code_train) == len(llm.TRAIN_MODULES) and len(corpus.code_heldout) == len(llm.HELDOUT_MODULES)
    assert len(corpus.doc_train) > 100 and len(corpus.doc_heldout) > 30
    for code in corpus.code_train + corpus.code_heldout:
        ast.parse(code)
    joined = "\n".join(corpus.code_train + corpus.code_heldout)
    for doc in corpus.doc_train + corpus.doc_heldout:
        # A docstring's longer lines never stay in the code (short ones, such as "Args:", may also be code).
        for line in doc.splitlines():
            if len(line) > 60:
                assert line.strip() not in joined, line


def test_split_docstrings_keeps_code_and_cleans_docstrings():
    source = (
        '"""Module doc."""\n'
        "import os\n"
        "\n"
        "class Café:\n"
        '    """Class doc,\n'
        "\n"
        '        over lines."""\n'
        "    x = 'é'\n"
        "\n"
        "    def f(self):\n"
        '        """Only a docstring."""\n'
        "\n"
        '    def g(self): "one line"; return 1\n'
        "\n"
        "def h():\n"
        "    # a comment stays\n"
        '    s = "not a docstring"\n'
    )
    code, docs = llm.split_docstrings(source)
    assert docs == ["Module doc.", "Class doc,\n\nover lines.", "Only a docstring.", "one line"]
    assert code == (
        "import os\n"
        "\n"
        "class Café:\n"
        "    x = 'é'\n"
        "\n"
        "    def f(self):\n"
        "        pass\n"
        "\n"
        "    def g(self): return 1\n"
        "\n"
        "def h():\n"
        "    # a comment stays\n"
        '    s = "not a docstring"\n'
    )
    ast.parse(code)


def test_the_tokenizer_round_trips_any_text(corpus, tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.pad_token == llm.END_OF_TEXT
    for text in (corpus.code_heldout[0], corpus.doc_heldout[0], "naïve — données 数据 🐍\r\n\ttab"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.eos_token_id not in ids
    # Trained again, the same vocabulary: the notebook's tokens are the same on every run.
    again = llm.train_tokenizer(corpus.code_train, vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_pack_cuts_one_stream_into_full_blocks(corpus, tokenizer):
    texts = corpus.doc_heldout
    blocks = llm.pack(texts, tokenizer, block_size=64)
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    assert blocks.column_names == ["input_ids", "labels"]
    assert len(blocks) == len(stream) // 64
    assert [t for row in blocks["input_ids"] for t in row] == stream[: len(blocks) * 64]
    assert blocks["labels"] == blocks["input_ids"]
    from transformers import default_data_collator

    batch = default_data_collator([blocks[i] for i in range(4)])
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "input_ids": (torch.long, (4, 64)),
        "labels": (torch.long, (4, 64)),
    }


def test_block_stream_is_an_iterable_dataset_of_the_same_blocks_every_pass(corpus, tokenizer):
    texts = corpus.doc_heldout
    stream = llm.BlockStream(texts, tokenizer, block_size=64, seed=1)
    assert isinstance(stream, torch.utils.data.IterableDataset) and not hasattr(stream, "__len__")
    first, second = list(stream), list(stream)
    assert first == second
    assert sorted(stream.order) == list(range(len(texts))) and stream.order != list(range(len(texts)))
    # The blocks `pack` makes of the texts in the stream's order: one stream of tokens, cut the same way.
    packed = llm.pack([texts[i] for i in stream.order], tokenizer, block_size=64)
    assert [b["input_ids"] for b in first] == packed["input_ids"]
    assert all(b["labels"] == b["input_ids"] and len(b["input_ids"]) == 64 for b in first)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(corpus, tokenizer):
    blocks = llm.pack(corpus.doc_heldout[:20], tokenizer, block_size=32)
    config = llm.llama_config(tokenizer, hidden=32, layers=1, heads=2, block_size=32)
    model = llm.PretrainFactory(config)()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 512
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the input embeddings: every logit 0, a uniform guess
    assert llm.perplexity(model, blocks, batch_size=3) == pytest.approx(512, rel=1e-4)


@pytest.mark.slow
def test_pretrain_then_lora_on_a_stream_then_reload(tmp_path, monkeypatch, corpus, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    import nexa_nb
    from nexa_nb.events import RecordingSink

    monkeypatch.chdir(tmp_path)
    config = llm.llama_config(tokenizer, hidden=32, layers=1, heads=2, block_size=32)
    code = llm.pack(corpus.code_heldout, tokenizer, block_size=32)
    docs = llm.pack(corpus.doc_heldout[:10], tokenizer, block_size=32)
    common = dict(procs=1, batch_size=4, max_steps=3, lr=1e-2, sinks=[RecordingSink()])
    task = nexa_nb.Task(
        llm.PretrainFactory(config), code, eval_data=docs, collate_fn=default_data_collator, tokenizer=tokenizer
    )
    pretrained = nexa_nb.train(task, output_dir="pretrained", **common)
    assert pretrained.status == "completed" and math.isfinite(pretrained.eval_metrics["loss"])

    stream = llm.BlockStream(corpus.doc_train[:10], tokenizer, block_size=32)
    tuned = nexa_nb.train(
        nexa_nb.Task(llm.PretrainedFactory("pretrained"), stream, eval_data=docs, collate_fn=default_data_collator),
        lora=True,
        lora_r=4,
        lora_alpha=8,
        output_dir="adapter",
        **common,
    )
    assert tuned.status == "completed" and len(tuned.history) == 3

    reloaded = AutoTokenizer.from_pretrained("pretrained")
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("pretrained"), "adapter")
    assert llm.perplexity(model, docs) == pytest.approx(math.exp(tuned.eval_metrics["loss"]), rel=1e-3)
    text = llm.generate(model, reloaded, "def ", new_tokens=5)
    assert text.startswith("def ") and len(reloaded(text)["input_ids"]) <= 1 + 5 + 1
