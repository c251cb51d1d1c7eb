#!/usr/bin/env bash
# Runs the test suite, first doing whatever set-up is still missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
