#!/usr/bin/env bash
# The first numbers from a GPU (issue 30): bert-6l with vanilla, clipped softmax and gated attention for a few hundred
# steps in bf16 under torch.compile, on the embedded corpus; prints per method tokens/s, MFU, clipped softmax's
# alive share at step 0 and the last logged loss. Under 5 minutes on one A100/H100-class GPU.
#
#   scripts/gpu_smoke.sh [OUT]                       (default OUT: runs/gpu-smoke; STEPS=300 BATCH=64 by default)
#   QUANTIZABLE_SMOKE_CPU=1 STEPS=4 BATCH=4 scripts/gpu_smoke.sh /tmp/smoke     (the same path on CPU, fp32)
#
# The project pins a CPU build of torch 2.13.0; on a GPU machine install the CUDA build of the same version into
# .venv first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT=${1:-runs/gpu-smoke}
STEPS=${STEPS:-300}
BATCH=${BATCH:-64}
if [ "${QUANTIZABLE_SMOKE_CPU:-0}" = 1 ]; then
  PRECISION=auto  # fp32 on CPU
elif python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PRECISION=bf16
else
  echo "error: no CUDA GPU visible to torch $(python -c 'import torch; print(torch.__version__)') (a CPU build?);" \
       "install the CUDA build of torch 2.13.0, or set QUANTIZABLE_SMOKE_CPU=1 to check the script on CPU" >&2
  exit 2
fi
started=$(date +%s)
declare -A PAPER=(  # the paper's BERT settings (experiments.plan.PAPER_ATTENTION)
  [vanilla]="" [clipped_softmax]="--set attention.gamma=-0.025"
  [gated_attention]="--set attention.gate_type=linear --set attention.pi_init=0.25")
for method in vanilla clipped_softmax gated_attention; do
  rm -rf "$OUT/$method"
  # shellcheck disable=SC2086  # the paper's settings are several words on purpose
  quantizable train --config bert-6l --out "$OUT/$method" --no-progress \
    --set attention.kind="$method" ${PAPER[$method]} --set data.source=null --set run.steps="$STEPS" --set run.batch_size="$BATCH" \
    --set optim.warmup_steps=$((STEPS / 10)) --set run.mixed_precision="$PRECISION" --set run.compile=true \
    --set run.eval_every=0 --set run.checkpoint_every=0 --set run.outlier_every="$STEPS" --set run.eval_batches=4 \
    --set run.log_every=$((STEPS / 10 > 0 ? STEPS / 10 : 1))
done
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

from quantizable.models import load_model

# dense bf16 peak FLOP/s by device name (MFU = 6 * parameters * tokens/s / peak; attention FLOPs left out)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
out = Path(sys.argv[1])
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
peak = next((value for name, value in PEAKS.items() if name in device), None)
print(f"device: {device}; MFU against a bf16 peak of {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {device}")
print("| method | tokens/s | MFU | alive share at step 0 | last loss | eval perplexity |")
print("|---|---:|---:|---:|---:|---:|")
for run in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()):
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_per_s = summary["samples_per_second"] * summary["tokens_per_sample"]
    parameters = sum(p.numel() for p in load_model(run).parameters())
    mfu = f"{6 * parameters * tokens_per_s / peak:.1%}" if peak else "-"
    alive = next((r["alive_share"] for r in records if r.get("step") == 0 and "alive_share" in r), None)
    loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
    print(f"| {run.name} | {tokens_per_s:,.0f} | {mfu} | {'-' if alive is None else f'{alive:.3f}'} | "
          f"{'-' if loss is None else f'{loss:.3f}'} | {summary['eval']['value']:.1f} |")
EOF
echo "wall time: $(( $(date +%s) - started )) s"
