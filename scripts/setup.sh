#!/usr/bin/env bash
# Idempotent set-up: system packages, the pinned virtual environment, the package, the default data.
# Sourced by ./quickstart.sh and ./test.sh; every step is skipped when already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"

# System packages holding the embedded default data (Debian). Only installed when missing.
APT_PACKAGES=(${QUANTIZABLE_APT_PACKAGES:-sword-text-web diatheke python3.11-doc dataset-fashion-mnist})
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating the virtual environment with pinned dependencies (about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt"
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
[ -f "${QUANTIZABLE_DATA:-$HOME/.cache/quantizable/data}/manifest.json" ] || "$VENV/bin/quantizable" data prepare --quiet
