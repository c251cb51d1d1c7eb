"""The longest-run trend (issue 17 item 6): one post-LN BERT MLM run of a method, as long as a time budget allows.

Trains the ``bert-cpu`` recipe (4 layers, d=128, [CLS]/[SEP] blocks of the embedded corpus) with the paper's
settings for the method, in slices of ``--every`` steps (``train(..., stop_after=...)``, so the schedule is the
one of ``--steps`` whatever the budget), logging the trainer's outlier metrics every slice and keeping a copy of
the weights at each slice end (``snapshots/step_N.safetensors``) for the mechanism metrics computed afterwards
by ``scripts/trend_report.py``. Interrupted runs continue where they stopped when started again.

    nice -n 19 python scripts/trend_run.py --method gated_attention --minutes 120 --out runs/trend
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from quantizable.experiments.plan import TASKS
from quantizable.training import train
from quantizable.training.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=("vanilla", "clipped_softmax", "gated_attention"))
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget; stops after the slice")
    parser.add_argument("--every", type=int, default=250, help="steps per slice (metrics and snapshot)")
    parser.add_argument("--steps", type=int, default=20_000, help="length of the learning-rate schedule")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    attention = TASKS["pretrain"].method_settings("bert", args.method)
    config = load_config("bert-cpu", [f"run.steps={args.steps}", f"run.outlier_every={args.every}",
                                      "run.eval_every=0", "run.checkpoint_every=0",
                                      f"attention={json.dumps(attention)}"])
    run_dir = args.out / args.method
    snapshots = run_dir / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    while time.monotonic() < deadline:
        checkpoints = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        done = int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0
        if done >= args.steps:
            break
        started = time.monotonic()
        train(config, run_dir, resume=bool(checkpoints), stop_after=done + args.every, progress=False)
        latest = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        shutil.copyfile(latest / "model.safetensors", snapshots / f"{latest.name}.safetensors")
        print(f"{args.method}: {latest.name} in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
