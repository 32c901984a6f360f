# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo
# a fresh clone has no ../shared; the demo then mixes generated noise instead of the real noise files
NOISE_DIR := $(wildcard ../shared/data/noise)

.PHONY: demo test venv bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/make_demo_corpus.py --output $(DEMO)/corpus $(if $(NOISE_DIR),--noise-dir $(NOISE_DIR))
	$(PY) jobs/preprocess.py --input $(DEMO)/corpus --output $(DEMO)/store --png
	@echo "demo: corpus in $(DEMO)/corpus, store in $(DEMO)/store"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf $(DEMO) .pytest_cache
