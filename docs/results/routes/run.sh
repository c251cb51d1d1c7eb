#!/usr/bin/env bash
# Issue 33: every route on the long backcopy run, two training seeds (docs/reproduce.md, "Routes to W8A8 on the
# long run"). Run 2026-12-04 06:06-07:02 UTC from a worktree of commit bf708b3 at nice -5; the table and figure
# were then written with the scripts of commit 9191ee4 (PTQ rows, curves).
set -euo pipefail
cd "$(dirname "$0")/../../.." && source .venv/bin/activate
nice -n -5 bash scripts/routes_run.sh /work/routes/out long > /work/routes/log2.txt 2>&1
python scripts/routes_table.py /work/routes/out
python scripts/routes_figure.py /work/routes/out/routes.json docs/results/routes/routes.png
