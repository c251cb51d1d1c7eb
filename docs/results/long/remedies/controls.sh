#!/usr/bin/env bash
# ln_decay controls: a second seed of gated + ln_decay, and vanilla + ln_decay (does it act on attention at all?).
cd /work/main; source .venv/bin/activate
export PYTHONPATH=/tmp/longsrc2/src OMP_NUM_THREADS=1
S="--set optim.decay_layernorm_gamma=true --set optim.weight_decay=0.1"
{ date; time python -m quantizable reproduce --scale long --methods gated_attention --train-seeds 2 --workers 1 $S --out /work/remedies/ln_decay; date; } > /work/remedies/ln_decay_seed1.log 2>&1 &
{ date; time python -m quantizable reproduce --scale long --methods vanilla --train-seeds 1 --workers 1 $S --out /work/remedies/vanilla_ln_decay; date; } > /work/remedies/vanilla_ln_decay.log 2>&1 &
wait
