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

REALSPEECH := $(wildcard ../shared/data/realspeech/manifest.tsv)
# 3-s windows give the network three times the examples of a 10-s window for the same compute

DEMO_FEATURES := --window-seconds 3
# the pretrained zero-shot backend beside the trained model, answering among the corpus's languages
WHISPER := --model whisper:base --languages en,de,es
# the demo schedule: the write-up's three stages, shortened to minutes on 2 CPU cores
DEMO_TRAIN := --arch resnet18 --epochs 1,8,1 --lr 1e-2,5e-3,1e-4 --batch-size 16 --workers 1 --cpus-per-worker 2

demo: $(STAMP)
	$(PY) jobs/make_demo_corpus.py --output $(DEMO)/corpus $(if $(NOISE_DIR),--noise-dir $(NOISE_DIR))
	$(PY) jobs/preprocess.py --input $(DEMO)/corpus --output $(DEMO)/store --png $(DEMO_FEATURES)
	$(PY) jobs/train.py --store $(DEMO)/store --output $(DEMO)/model $(DEMO_TRAIN)
	$(PY) jobs/evaluate.py --model $(DEMO)/model --store $(DEMO)/store --output $(DEMO)/report
ifneq ($(REALSPEECH),)
	$(PY) jobs/preprocess.py --input $(REALSPEECH) --output $(DEMO)/realspeech-store --split test --quiet $(DEMO_FEATURES)
	$(PY) jobs/evaluate.py --model $(DEMO)/model --store $(DEMO)/realspeech-store --output $(DEMO)/report-realspeech --quiet
	$(PY) jobs/preprocess.py --input $(REALSPEECH) --output $(DEMO)/realspeech-whisper-store --split test --quiet --frontend whisper-mel:base
	$(PY) jobs/evaluate.py --model whisper:base --store $(DEMO)/realspeech-whisper-store --output $(DEMO)/report-realspeech-whisper --quiet
endif
	$(PY) jobs/label.py --model $(DEMO)/model --input "$(DEMO)/corpus/test/test/*.flac" --output $(DEMO)/labels.csv
	$(PY) jobs/label.py $(WHISPER) --input "$(DEMO)/corpus/test/test/*.flac" --output $(DEMO)/labels-whisper.csv
	$(PY) jobs/label.py --model $(DEMO)/model --input $(DEMO)/long --output $(DEMO)/labels-long.csv --segments $(DEMO)/segments-long.csv
	$(PY) jobs/label.py $(WHISPER) --input $(DEMO)/long --output $(DEMO)/labels-long-whisper.csv --segments $(DEMO)/segments-long-whisper.csv
	@echo "demo: corpus $(DEMO)/corpus, store $(DEMO)/store, model $(DEMO)/model, report $(DEMO)/report/report.md,"
	@echo "      labels $(DEMO)/labels.csv, long files $(DEMO)/labels-long.csv with timeline $(DEMO)/segments-long.csv;"
	@echo "      whisper:base's labels beside them: $(DEMO)/labels-whisper.csv, $(DEMO)/labels-long-whisper.csv"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/train_stream.py
	$(PY) benchmarks/onnx_speed.py
	$(PY) benchmarks/label.py
	$(PY) benchmarks/label.py --memory
	$(PY) benchmarks/scaling.py
ifneq ($(REALSPEECH),)
	$(PY) benchmarks/whisper_speed.py
	$(PY) benchmarks/realspeech.py
endif

clean:
	rm -rf $(DEMO) .pytest_cache
