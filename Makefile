# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if needed and runs a real training end to end on this machine
#   make test   creates .venv (and .venv-yolo) if needed and runs the whole test suite (unit,
#               multi-process, kernel, browser and notebook tests, the YOLO tutorial included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nexa-installed
YOLO_VENV ?= .venv-yolo
YOLO_PY := $(YOLO_VENV)/bin/python
YOLO_STAMP := $(YOLO_VENV)/.nexa-installed

.PHONY: demo test lint test-yolo test-gpu bench bench-gpu system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (see README, "Which torch"); other torch builds work too.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,trackers,tutorials]"
	touch $(STAMP)

# Tutorial 02 in its own environment: beside the CPU torch the only torchvision on the index
# (0.28, a CUDA build) cannot be imported and breaks transformers' model loading. torch==2.13.0
# in the same command stops pip taking torchvision 0.29 with the CUDA torch 2.15.
$(YOLO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(YOLO_VENV)
	$(YOLO_PY) -m pip install --quiet --upgrade pip
	$(YOLO_PY) -m pip install --quiet -e ".[test,yolo]" "torch==2.13.0"
	touch $(YOLO_STAMP)

demo: $(STAMP)
	$(PY) -m nexa_nb.demo

# Debian packages the tests need: chromium (browser tests) and libaio-dev (DeepSpeed's async
# I/O op, for NVMe offload). Installed when running as root with apt-get; named otherwise.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -e /usr/include/libaio.h ] || missing="$$missing libaio-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "some tests need Debian packages:$$missing (sudo apt-get install$$missing)"; fi; fi

# This environment's tools first on PATH: DeepSpeed compiles its ops with the first ninja found.
test: $(STAMP) $(YOLO_STAMP) system-deps lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests notebooks --nbval-lax --nbval-cell-timeout=600 --ignore=notebooks/02_yolo.ipynb
	$(MAKE) --no-print-directory test-yolo

# Formatting and lint: part of `make test`, so a lint error fails CI.
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test-yolo: $(YOLO_STAMP)
	PATH="$(abspath $(YOLO_VENV))/bin:$$PATH" $(YOLO_PY) -m pytest -q --nbval-lax --nbval-cell-timeout=600 --nbval-current-env notebooks/02_yolo.ipynb tests/test_tutorial_yolo.py

# The tests that need a CUDA GPU (skipped, each with the reason, on a machine without one).
test-gpu: $(STAMP) system-deps
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m gpu tests/test_gpu.py tests/test_step_sync.py

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) $(YOLO_VENV) .pytest_cache tests/artifacts
