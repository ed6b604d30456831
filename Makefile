# mlx-flash: the two commands a new user runs are `make app` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlx-flash-installed

.PHONY: app test test-all bench install model test-data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Convert the embedded default model (SmolLM2-135M-Instruct GGUF) once into the user data folder.
model: install
	$(BIN)/mlx-flash prepare

app: model
	$(BIN)/mlx-flash-app

# Real English text for the quality tests (Debian's bible-kjv); skipped with a note where it cannot be installed.
test-data:
	@bash tests/data/install_text.sh

test: model test-data
	$(BIN)/python -m pytest

# Also the long tests (marked slow).
test-all: model test-data
	$(BIN)/python -m pytest -m ""

bench: model
	$(BIN)/mlx-flash bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
