#!/usr/bin/env bash
# The main job: the local devnet on the embedded defaults (configs/devnet.toml). Starts anvil
# with our registry, the blob server, 3 honest miners, a lazy and a copycat miner, 2 validators
# and a merger as processes on 127.0.0.1, runs 3 rounds with a live view, prints the summary
# (also runs/devnet/summary.json) and exits non-zero if the network did not do its job.
# Extra arguments go to `moesaic devnet` (e.g. --rounds 5, --preset tiny).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
moesaic devnet --out runs/devnet --json-summary runs/devnet/summary.json "$@"
