#!/usr/bin/env bash
# The test command: installs everything it needs, then runs ruff and the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
ruff check .
ruff format --check .
# --help must stay light: fail if it imports torch.
python - <<'PY'
import subprocess, sys
out = subprocess.run([sys.executable, "-X", "importtime", "-m", "moesaic", "--help"],
                     capture_output=True, text=True, check=True)
assert " torch" not in out.stderr, "moesaic --help imported torch"
PY
python -m pytest -q "$@"
