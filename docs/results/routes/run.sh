#!/usr/bin/env bash
# Issue 33, this session's part: the routes that train at the long scale's speed on this CPU (Muon is 14x slower
# here: bf16 Newton-Schulz), one training seed: vanilla, gated attention, sink logit, and QAT W8A8 of vanilla.
set -euo pipefail
cd /work/main && source .venv/bin/activate
out=/work/routes/out
mkdir -p $out
{ date -u; uptime; grep -m1 -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git rev-parse HEAD; } > $out/machine.txt
start=$(date +%s)
quantizable reproduce --scale long --train-seeds 1 --methods vanilla,gated_attention,sink_logit --out $out/kinds
echo "kinds done $(( $(date +%s) - start )) s; $(uptime)" >> $out/machine.txt
run=$(ls -d $out/kinds/runs/backcopy-opt-vanilla-seed0*)
dest=$out/qat/seed0
[ -d "$dest/model" ] || { rm -rf "$dest"; quantizable train --config "$run/config.yaml" --init-from "$run" --no-progress --out "$dest" \
    --set qat.setting=w8a8 --set run.steps=800 --set run.snapshot_every=0 --set run.checkpoint_every=0 \
    --set run.outlier_every=0 --set optim.warmup_steps=0; }
echo "qat done $(( $(date +%s) - start )) s; $(uptime)" >> $out/machine.txt
python scripts/routes_table.py $out --scale long || echo "table failed"
echo "all done $(( $(date +%s) - start )) s" >> $out/machine.txt
