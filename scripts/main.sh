#!/usr/bin/env bash
# The main job. Until the devnet exists (issue 5) it builds the tiny demo base and runs the
# quality table on its quick preset, writing results under runs/quality-quick/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
python scripts/quality_table.py --quick --out runs/quality-quick "$@"
