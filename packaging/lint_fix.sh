#!/usr/bin/env bash
# lint_fix.sh: for the lead, once, after merging the session's branches (issue #18). The lint gate
# (`make lint`) went in while other helpers were editing the files below, so pyproject.toml switches some
# findings off in exactly these files (marked TEMPORARY). This script runs ruff's autofixes on them and
# lists what is left to fix by hand; then delete the TEMPORARY per-file-ignores and mypy overrides in
# pyproject.toml and run `make lint`.
#
#   bash packaging/lint_fix.sh            autofix, then list the rest (ruff and mypy, without the exceptions)
#
# Uses the venv's tools (`make lint` installs them: the project's `lint` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"

FILES=(
  mlx_flash/engine.py mlx_flash/calibrate.py mlx_flash/gate_first.py mlx_flash/storage/format.py
  app/widgets/stats_panel.py
)

NO_EXCEPTIONS=(--config 'lint.per-file-ignores = {}')

# 1. the autofixes: import order (I001), unused imports (F401), unused noqa comments (RUF100)
"$BIN/ruff" check --fix "${NO_EXCEPTIONS[@]}" "${FILES[@]}" || true

# 2. what is left by hand: long lines (E501), imports inside functions (PLC0415: move them to the top; an
#    import that must stay deferred gets `# noqa: PLC0415 - <why>`), B007/B904/E731
echo "== ruff: left to fix by hand"
"$BIN/ruff" check "${NO_EXCEPTIONS[@]}" --output-format concise "${FILES[@]}" || true

# 3. mypy's findings in the same files (the TEMPORARY [[tool.mypy.overrides]] switch them off by code)
echo "== mypy: with the temporary overrides removed, these are the findings to fix"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/pyproject.toml" <<'EOF'
import re, sys
text = open("pyproject.toml", encoding="utf-8").read()
# drop the TEMPORARY mypy overrides (the block after the TEMPORARY comment of the mypy section)
head, sep, tail = text.partition("# TEMPORARY, for the merge of this session's branches: the findings in files")
open(sys.argv[1], "w", encoding="utf-8").write(head if sep else text)
EOF
"$BIN/mypy" --config-file "$tmp/pyproject.toml" mlx_flash || true

# 4. neuron_cache.py (also edited on those branches) annotates its `layout` parameters as dict; they take
#    storage.format.bundle_segments' list too. The MoE package passes that list under line-level
#    `type: ignore[arg-type]` marked TEMPORARY (#18): fix the annotation in neuron_cache.py, then delete them
#    (mypy's warn_unused_ignores reports them once the annotation is right).
echo "== TEMPORARY (#18) line-level ignores"
grep -rn "TEMPORARY (#18)" mlx_flash app || true
