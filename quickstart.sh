#!/usr/bin/env bash
# The main job: set-up if needed, then the quick reproduction of the paper's comparison on the embedded data.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec quantizable reproduce --quick --out runs/quickstart "$@"
