#!/usr/bin/env bash
# Issue 33: every route to W8A8 on the same Bigram-Backcopy runs (the long scale of `reproduce --scale long`,
# docs/reproduce.md): vanilla, gated attention, sink logit, Muon, Muon + single-scale norm, full OSP (Muon +
# single-scale norm + embedding projection), the PTQ baselines on each kinds run, and a short W8A8 QAT fine-tune of each
# vanilla run; then one table
# (OUT/routes.md, OUT/routes.json): FP, W8A8/W8A6/W8A4, max inf-norm, kurtosis, train-step time.
#
#   scripts/routes_run.sh OUT [SCALE [QAT_STEPS]]     SCALE: long (default) or long-tiny (smoke test)
#
# Resumable: reproduce reuses finished runs, QAT runs with a model/ are kept.
set -euo pipefail
out=${1:?usage: scripts/routes_run.sh OUT [long|long-tiny] [QAT_STEPS]}
scale=${2:-long}
qat_steps=${3:-$([ "$scale" = long ] && echo 800 || echo 4)}
mkdir -p "$out"
{ date -u; uptime; grep -m1 -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; 
  git -C "$(dirname "$0")/.." rev-parse HEAD; } > "$out/machine.txt"
start=$(date +%s)
repro() { quantizable reproduce --scale "$scale" --out "$out/$1" "${@:2}"; echo "$1 done $(( $(date +%s) - start )) s; $(uptime)" >> "$out/machine.txt"; }
repro kinds --methods vanilla,gated_attention,sink_logit --ptq smoothquant,rotation,per_token,outlier_fp
repro muon --methods vanilla --set optim.name=muon
repro muon-ss --methods vanilla --set optim.name=muon --set model.norm=single_scale
repro osp --methods vanilla --set optim.name=muon --set model.norm=single_scale --set model.embedding_projection=true
# QAT: fine-tune each vanilla run with the W8A8 quantizers in the forward, at its own (constant) lr
for run in "$out"/kinds/runs/backcopy-opt-vanilla-seed*; do
  seed=${run##*-seed}; seed=${seed%%-*}
  dest="$out/qat/seed$seed"
  [ -d "$dest/model" ] && continue
  rm -rf "$dest"
  quantizable train --config "$run/config.yaml" --init-from "$run" --no-progress --out "$dest" \
    --set qat.setting=w8a8 --set run.steps="$qat_steps" --set run.snapshot_every=0 --set run.checkpoint_every=0 \
    --set run.outlier_every=0 --set optim.warmup_steps=0
done
uptime >> "$out/machine.txt"
python "$(dirname "$0")/routes_table.py" "$out" --scale "$scale"
