"""Benchmarks of nexa_nb against the hand-written loops and tools it replaces.

``python -m benchmarks.run`` measures the CPU figures (1-5; 6 with ``--notebooks``),
``python -m benchmarks.gpu`` the GPU figures (7-9). See ``benchmarks/README.md`` for what
each figure measures, how, and how to re-run it.
"""
