# kensa — the two commands that matter are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= .kensa/demo

.PHONY: install demo test lint samples clean

# Create the venv and install kensa with its dev tools. pip takes torch and torchvision from this
# machine's local wheels (the pinned versions); re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kensa demo --out $(DEMO_DIR)

lint: install
	$(BIN)/ruff check kensa models flows serving monitoring tests bench
	$(BIN)/mypy kensa models flows serving

test: install lint
	$(BIN)/pytest -q

samples: install
	$(BIN)/kensa line samples --out docs/images

clean:
	rm -rf $(VENV) .kensa .pytest_cache .mypy_cache .ruff_cache
