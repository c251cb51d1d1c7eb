#!/usr/bin/env bash
# Remedies for gated attention's W8A8 loss on the long backcopy run: one seed each, two at a time, one thread each.
cd /work/main; source .venv/bin/activate
export PYTHONPATH=/tmp/longsrc2/src OMP_NUM_THREADS=1
one() {
  name=$1; shift
  sets=(); for s in "$@"; do sets+=(--set "$s"); done
  { date; time python -m quantizable reproduce --scale long --methods gated_attention --train-seeds 1 --workers 1 \
      "${sets[@]}" --out /work/remedies/$name; date; } > /work/remedies/$name.log 2>&1
}
export -f one
uptime > /work/remedies/load_start.txt
printf '%s\n' \
  "ln_decay optim.decay_layernorm_gamma=true optim.weight_decay=0.1" \
  "lr_decay optim.final_lr_fraction=0.0" \
  "lr_1e-3 optim.lr=1e-3" \
  "mlp_gate attention.gate_type=mlp" \
  "pi_0.5 attention.pi_init=0.5" \
  "wd_0.1 optim.weight_decay=0.1" \
  | xargs -P 2 -L 1 bash -c 'one "$@"' _
uptime > /work/remedies/load_end.txt
