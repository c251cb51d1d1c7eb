#!/usr/bin/env bash
# Issue 33, ViT registers: vanilla ViT on the embedded image task (Fashion-MNIST, the quick scale's CPU preset,
# 300 steps, two training seeds x two calibration seeds) without and with 4 registers (model.registers=4).
set -euo pipefail
cd /work/main && source .venv/bin/activate
out=${1:-/tmp/registers}
mkdir -p $out
{ date -u; uptime; grep -o -w 'avx2\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git rev-parse HEAD; } > $out/machine.txt
start=$(date +%s)
quantizable reproduce --scale quick --task pretrain --methods vanilla --out $out/reg0
echo "reg0 done $(( $(date +%s) - start )) s; $(date -u); $(uptime)" >> $out/machine.txt
quantizable reproduce --scale quick --task pretrain --methods vanilla --set model.registers=4 --out $out/reg4
echo "reg4 done $(( $(date +%s) - start )) s; $(date -u); $(uptime)" >> $out/machine.txt
# then the attention the image tokens put on the registers (register_attention.txt):
# python docs/results/registers/register_attention.py $out/reg4/runs/*/
