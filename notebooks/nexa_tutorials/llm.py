"""The language-model tutorial's text, tokenizer, blocks and perplexity (06).

- `collect_corpus`: text every Python installation has, the standard library's own sources.
  A fixed, sorted list of modules (`TRAIN_MODULES`, `HELDOUT_MODULES`) whose files are the
  same, byte for byte, in CPython 3.10.13, 3.11.2 (Debian's), 3.11.7, 3.12.1 and 3.13.0
  (`SOURCE_SHA256`). Each file is cut in two styles of text: its *code* with the
  docstrings taken out (comments stay), and its *docstrings*, cleaned as ``help()`` shows them.
- `train_tokenizer`: a byte-level BPE tokenizer trained with ``tokenizers`` on the training
  code, wrapped as a ``transformers.PreTrainedTokenizerFast``.
- `pack`: documents -> a ``datasets.Dataset`` of fixed-length blocks of token ids, every
  document followed by the end-of-text token, ``labels`` = ``input_ids`` (the model shifts them);
  `BlockStream`: the same blocks as a stream (a torch ``IterableDataset``), packed as it is read.
- `llama_config`, `PretrainFactory` and `PretrainedFactory`: a small Llama built from a config in
  code, and the model factories of the two runs (a fresh model; the pretrained one, loaded from
  the folder the first run wrote), called in each worker process.
- `perplexity`: exp of the mean per-token loss over a dataset of blocks, for any causal LM in
  the kernel (the same number nexa_nb's evaluation reports as ``exp(eval_metrics["loss"])``).
- `generate`: greedy continuation of a prompt, with a penalty on repeats.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import os
import random
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import IterableDataset

END_OF_TEXT = "<|endoftext|>"

# Modules whose source is identical in CPython 3.10.13, 3.11.2, 3.11.7, 3.12.1 and 3.13.0, chosen
# to be ordinary code with docstrings (no generated tables): paths relative to the stdlib folder.
TRAIN_MODULES = (
    "_compression.py",
    "_py_abc.py",
    "_threading_local.py",
    "asyncio/protocols.py",
    "asyncio/windows_utils.py",
    "curses/__init__.py",
    "difflib.py",
    "email/_encoded_words.py",
    "importlib/metadata/_functools.py",
    "json/scanner.py",
    "multiprocessing/dummy/__init__.py",
    "multiprocessing/dummy/connection.py",
    "multiprocessing/heap.py",
    "multiprocessing/popen_forkserver.py",
    "multiprocessing/popen_spawn_posix.py",
    "multiprocessing/reduction.py",
    "multiprocessing/sharedctypes.py",
    "nturl2path.py",
    "optparse.py",
    "tracemalloc.py",
    "unittest/_log.py",
    "unittest/signals.py",
    "unittest/suite.py",
    "unittest/util.py",
    "urllib/robotparser.py",
    "xml/dom/__init__.py",
    "xml/dom/domreg.py",
    "xml/dom/minicompat.py",
    "xml/dom/xmlbuilder.py",
    "xml/sax/saxutils.py",
)
# Never trained on in either stage: the held-out code (stage 1) and docstrings (stage 2).
HELDOUT_MODULES = (
    "_markupbase.py",
    "json/__init__.py",
    "pyclbr.py",
    "wsgiref/headers.py",
    "xml/sax/handler.py",
)

# The first 16 hex digits of each file's SHA-256, the same in every release named above.
SOURCE_SHA256 = {
    "_compression.py": "3ad5d60627477a60",
    "_py_abc.py": "f9c6fe3dd9b51bd7",
    "_threading_local.py": "e1bf3dae66d0bfa6",
    "asyncio/protocols.py": "1d1b49988c338b4e",
    "asyncio/windows_utils.py": "e6fcffefa2521666",
    "curses/__init__.py": "d8730e360dd00ec0",
    "difflib.py": "0c6afc23568d55b3",
    "email/_encoded_words.py": "4178321600c0a19c",
    "importlib/metadata/_functools.py": "3ec636fb8aeb297e",
    "json/scanner.py": "8604d9d03786d0d5",
    "multiprocessing/dummy/__init__.py": "9127a40ea0ff342c",
    "multiprocessing/dummy/connection.py": "d63dd1979fde9c13",
    "multiprocessing/heap.py": "f6bb79bb99b9ae48",
    "multiprocessing/popen_forkserver.py": "0588ad0e5a36718b",
    "multiprocessing/popen_spawn_posix.py": "97b5d25aa4795168",
    "multiprocessing/reduction.py": "4999f8b9ae7b3e8a",
    "multiprocessing/sharedctypes.py": "77ef522912474652",
    "nturl2path.py": "980982ba66cc403d",
    "optparse.py": "07d224301cba312f",
    "tracemalloc.py": "c2cc84a05b824df7",
    "unittest/_log.py": "905672317ab26c65",
    "unittest/signals.py": "f8286e818ca56e10",
    "unittest/suite.py": "ed2da92bc9f97c53",
    "unittest/util.py": "fdcc640c3505d16d",
    "urllib/robotparser.py": "389b811835f9a3ba",
    "xml/dom/__init__.py": "b415a6f3d3663c3a",
    "xml/dom/domreg.py": "826b02a803930834",
    "xml/dom/minicompat.py": "42974c4c67803dfe",
    "xml/dom/xmlbuilder.py": "d4f33a8f01875562",
    "xml/sax/saxutils.py": "3fe2cdb6386e0c4d",
    "_markupbase.py": "cb14dd6f2e2439eb",
    "json/__init__.py": "d5d41e2c29049515",
    "pyclbr.py": "e8ca09333701ba41",
    "wsgiref/headers.py": "0fbf95a47d8e4c0d",
    "xml/sax/handler.py": "64c7aae49f1dd382",
}


# `Corpus.digest` of the text cut from those files, the same in all the releases above.
CORPUS_DIGEST = "2e386cbcca110a31"


class Corpus(NamedTuple):
    """The tutorial's four sets of documents (one string per module's code, or per docstring)."""

    code_train: list[str]
    code_heldout: list[str]
    doc_train: list[str]
    doc_heldout: list[str]
    digest: str
    """The first 16 hex digits of the SHA-256 of all four, in order: equal digests, equal text."""


def stdlib_dir() -> Path:
    """The folder of this interpreter's standard library (``sysconfig``'s "stdlib" path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_source(module: str, root: str | os.PathLike | None = None) -> str:
    """One standard-library file's text, with ``\\n`` line ends."""
    path = Path(root or stdlib_dir()) / module
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n")


def source_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _docstring_nodes(tree: ast.Module) -> list[tuple[ast.Expr, bool]]:
    """The docstring statements of a module and of every class and function in it, each with
    whether it is the whole body (a function that only has a docstring)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    found.append((first, len(node.body) == 1 and not isinstance(node, ast.Module)))
    return found


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """A module's source -> (its code without docstrings, its docstrings in source order).

    A docstring alone on its lines goes with those lines (and a blank line after them); one that shares a line with code
    (``def f(): "doc"; return 1``) leaves the code; one that is a whole body becomes ``pass``:
    the code still parses. The docstrings are cleaned as ``help()`` shows them
    (``inspect.cleandoc``: no common indentation, no blank first and last lines).
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    nodes = sorted(_docstring_nodes(tree), key=lambda item: (item[0].lineno, item[0].col_offset))
    docstrings = [inspect.cleandoc(node.value.value) for node, _ in nodes]
    # Cut from the end, so that earlier positions stay valid; columns count UTF-8 bytes.
    for node, whole_body in reversed(nodes):
        first, last = node.lineno - 1, node.end_lineno - 1
        head = lines[first].encode("utf-8")[: node.col_offset].decode("utf-8")
        tail = lines[last].encode("utf-8")[node.end_col_offset :].decode("utf-8")
        rest = tail.lstrip(" \t")
        rest = rest[1:].lstrip(" \t") if rest.startswith(";") else rest  # '"doc"; x = 1' keeps 'x = 1'
        if whole_body:
            lines[first : last + 1] = [head + "pass" + tail]
        elif not head.strip() and not rest.strip():  # its own lines, and the blank line after it
            blank_after = last + 1 < len(lines) and not lines[last + 1].strip()
            lines[first : last + 2 if blank_after else last + 1] = []
        else:
            lines[first : last + 1] = [head + rest]
    return "".join(lines), docstrings


def collect_corpus(root: str | os.PathLike | None = None) -> Corpus:
    """Read `TRAIN_MODULES` and `HELDOUT_MODULES` from the standard library and cut each in two styles."""
    parts: dict[str, list[str]] = {"code_train": [], "code_heldout": [], "doc_train": [], "doc_heldout": []}
    for split, modules in (("train", TRAIN_MODULES), ("heldout", HELDOUT_MODULES)):
        for module in modules:
            code, docstrings = split_docstrings(read_source(module, root))
            parts[f"code_{split}"].append(code)
            parts[f"doc_{split}"].extend(docstrings)
    digest = hashlib.sha256()
    for texts in parts.values():
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
    return Corpus(**parts, digest=digest.hexdigest()[:16])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, as a ``transformers.PreTrainedTokenizerFast``.

    Byte-level: every text is first turned into bytes, each of the 256 bytes is in the vocabulary
    from the start, so any string can be encoded (no unknown token) and decoded back exactly. BPE
    then merges the most frequent neighbouring pairs until the vocabulary has `vocab_size` entries.
    ``<|endoftext|>`` separates documents and serves as the padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Training on one thread: a tokenizer whose thread pool has run warns in every forked worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def _quiet_datasets() -> None:
    """No progress bars from ``datasets`` (every ``map`` would draw one in the notebook)."""
    import datasets

    datasets.disable_progress_bars()


def pack(texts: Sequence[str], tokenizer, block_size: int = 128):
    """Documents -> a ``datasets.Dataset`` of blocks of exactly `block_size` tokens.

    Each document is tokenized (without a tokenizer's own begin/end tokens, which the one of
    `train_tokenizer` has none of) and followed by the end-of-text token; all of them are joined
    into one stream, which is cut into blocks (the tail shorter than a block is dropped). The
    columns are ``input_ids`` and ``labels``, the same ids: a causal LM shifts the labels by one
    position itself, so each position is trained to predict the next token.
    """
    from datasets import Dataset

    _quiet_datasets()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the kernel forks workers later
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos] for ids in encoded]}

    def group(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    documents = Dataset.from_dict({"text": list(texts)})
    tokens = documents.map(tokenize, batched=True, remove_columns=["text"])
    # One batch for the whole set: one stream, so no tail is dropped between batches.
    return tokens.map(group, batched=True, batch_size=None)


class BlockStream(IterableDataset):
    """Documents packed into blocks *as they are read*: a stream for ``nexa_nb.Task``'s train_data.

    Every ``__iter__`` tokenizes the documents one by one, in a fixed shuffled order (`seed`),
    and yields a block (``{"input_ids": [...], "labels": [...]}``, `block_size` ids) whenever
    enough tokens have arrived: no list of blocks is made, as when the text comes from files
    too large to hold. Each pass yields the same blocks in the same order, which a resume relies
    on; the tokens left over at the end of a pass are dropped. Its length is unknown to the
    trainer, so a run needs ``--max-steps``.
    """

    def __init__(self, texts: Sequence[str], tokenizer, block_size: int = 128, seed: int = 0):
        self.texts, self.tokenizer, self.block_size = list(texts), tokenizer, block_size
        self.order = list(range(len(self.texts)))
        random.Random(seed).shuffle(self.order)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize, after the fork

    def __iter__(self):
        buffer: list[int] = []
        for i in self.order:
            ids = self.tokenizer(self.texts[i], add_special_tokens=False)["input_ids"]
            buffer += ids + [self.tokenizer.eos_token_id]
            while len(buffer) >= self.block_size:
                block, buffer = buffer[: self.block_size], buffer[self.block_size :]
                yield {"input_ids": block, "labels": list(block)}


def llama_config(tokenizer, hidden: int = 192, layers: int = 4, heads: int = 4, block_size: int = 128):
    """A small Llama (RMSNorm, rotary positions, SwiGLU MLP) sized for `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


class PretrainFactory:
    """Builds a fresh, randomly initialised ``LlamaForCausalLM`` from `config` (in each worker)."""

    def __init__(self, config):
        self.config = config

    def __call__(self):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(self.config)


class PretrainedFactory:
    """Loads the pretrained model from the folder a run wrote (``result.model_dir``), in each worker."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = str(model_dir)

    def __call__(self):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(self.model_dir)


def perplexity(model, blocks, batch_size: int = 32) -> float:
    """exp(mean loss per predicted token) of a causal LM over a dataset of equal-length blocks.

    Every block predicts ``block_size - 1`` tokens, so this is also exp of the mean over blocks of
    each block's loss: the mean nexa_nb's evaluation takes (``result.eval_metrics["loss"]``).
    """
    import torch
    from transformers import default_data_collator

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = default_data_collator([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
            loss = model(**batch).loss
            total += loss.item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return math.exp(total / count)


def generate(model, tokenizer, prompt: str, new_tokens: int = 40) -> str:
    """`prompt` and its greedy continuation of `new_tokens` tokens (at most), decoded.

    Greedy: always the most likely next token, so the same model writes the same text. A small
    model left alone soon repeats one word; a mild penalty on tokens already written and a ban
    on repeating any three tokens in a row keep it going (still without chance).
    """
    import torch

    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=1.2,
            no_repeat_ngram_size=3,
            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0])
