# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if needed and runs a real training end to end on this machine
#   make test   creates .venv if needed and runs the whole test suite (unit, multi-process,
#               kernel, browser and notebook tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nexa-installed

.PHONY: demo test bench bench-gpu browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (see README, "Which torch"); other torch builds work too.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,trackers]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nexa_nb.demo

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need Debian's chromium: sudo apt-get install chromium"; fi; }

test: $(STAMP) browser-deps
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
