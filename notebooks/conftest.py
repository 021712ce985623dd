"""nbval settings for the tutorial notebooks: ``pytest --nbval-lax notebooks/``.

Cells marked ``# NBVAL_CHECK_OUTPUT`` are compared with their saved output. The memory
plans in those cells mention how much host memory is free right now, and exported commands
the path of the kernel's Python; both are replaced by a placeholder on both sides before the
comparison. When ``--nbval-sanitize-with
FILE`` is given, FILE is used instead.

The notebooks name the kernel ``python3``: Jupyter starts it with the Python that runs
pytest (``python`` in a kernelspec is replaced by the running interpreter), so run the
tests with the environment's own Python: ``.venv/bin/python -m pytest --nbval-lax notebooks/``.
"""

from __future__ import annotations

import os
import sys
import tempfile

# Host memory free now: "19.94 GiB available", "within 8.97 GiB usable (90% of 9.97 GiB) per
# device and 19.94 GiB of host memory".
# The kernel's own Python, which exported commands name: "/home/me/env/bin/python -m accelerate...".
SANITIZE = r"""
regex: \d+(\.\d+)? (B|KiB|MiB|GiB|TiB)(?= available| usable|\) per device| of host memory)
replace: <host memory>
regex: \S*/bin/python[0-9.]*(?= -m )
replace: <python>
"""


def pytest_configure(config):
    option = config.option
    if not (getattr(option, "nbval", False) or getattr(option, "nbval_lax", False)):
        return
    # DeepSpeed compiles its CPU extensions with the first `ninja` on PATH; the environment's own
    # comes first, as for `make test`, so both build the same cache.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    if getattr(option, "nbval_sanitize_with", None) is None:
        handle, path = tempfile.mkstemp(prefix="nbval-sanitize-", suffix=".cfg")
        with os.fdopen(handle, "w") as f:
            f.write(SANITIZE)
        option.nbval_sanitize_with = path
        config.add_cleanup(lambda: os.unlink(path))
