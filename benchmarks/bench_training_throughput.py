"""Training throughput of each CPU preset: tokens/s (text) or images/s (ViT) over a short run of the real trainer.

Each preset trains ``--steps`` optimizer steps on the default data with evaluation, checkpoints and outlier
statistics switched off (only the training loop is timed, data loading included). One run per preset, one thread.
``--allocator both`` first trains every preset with glibc's own malloc setting (``QUANTIZABLE_KEEP_FREED_MEMORY=0``,
before anything changed it), then with the trainer's default that keeps freed memory; ``--optimizer both`` first
with torch's default AdamW (``optim.fused=false``: a per-parameter loop on CPU), then with the fused one. The last
column is the ratio to the first setting.

    python benchmarks/bench_training_throughput.py              # ~20 steps per preset
    python benchmarks/bench_training_throughput.py --allocator both --json out.json
    python benchmarks/bench_training_throughput.py --optimizer both
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from quantizable.benchmarking import BenchmarkRun
from quantizable.training import load_config, train

PRESETS = ("bert-cpu", "opt-cpu", "vit-cpu")


def measure(preset: str, steps: int, attention: str, fused_adamw: bool) -> dict:
    config = load_config(preset, [f"run.steps={steps}", f"optim.warmup_steps={min(steps, 10)}", "run.eval_every=0",
                                  "run.checkpoint_every=0", "run.outlier_every=0", "run.eval_batches=1", f"attention.kind={attention}",
                                  f"optim.fused={str(fused_adamw).lower()}"]
                         + (["attention.gamma=-0.025"] if attention == "clipped_softmax" else []))
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(config, Path(run_dir), progress=False)
    samples = summary["samples_per_second"]
    unit = "images" if summary["task"] == "image" else "tokens"
    return {"preset": preset, "model": config.model.preset, "attention": attention, "steps": steps,
            "batch": config.run.batch_size * config.optim.grad_accum, "seq_len": summary["tokens_per_sample"],
            "unit": unit, "per_second": samples * summary["tokens_per_sample"], "seconds": summary["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention", nargs="+", default=["vanilla"],
                        choices=["vanilla", "clipped_softmax", "gated_attention"])
    parser.add_argument("--allocator", choices=("kept", "default", "both"), default="kept",
                        help="glibc malloc: kept (the trainer's default), default (glibc's own) or both")
    parser.add_argument("--optimizer", choices=("fused", "loop", "both"), default="fused",
                        help="AdamW: fused (the trainer's default), loop (torch's default on CPU) or both")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = BenchmarkRun("training_throughput", {k: v for k, v in vars(args).items() if k != "json"})
    rows = []
    allocators = ("default", "kept") if args.allocator == "both" else (args.allocator,)
    optimizers = ("loop", "fused") if args.optimizer == "both" else (args.optimizer,)
    for allocator in allocators:
        os.environ["QUANTIZABLE_KEEP_FREED_MEMORY"] = "1" if allocator == "kept" else "0"
        rows += [{**measure(preset, args.steps, attention, optimizer == "fused"), "allocator": allocator,
                  "adamw": optimizer}
                 for optimizer in optimizers for preset in PRESETS for attention in args.attention]
    print(f"torch {torch.__version__}, {run.machine['cpu']} {run.machine['cpu_flags']}, {args.threads} thread(s), "
          f"{args.steps} steps per preset")
    print("| preset | model | attention | allocator | AdamW | batch x T | throughput | seconds | vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = {}
    for r in rows:
        shape = f"{r['batch']} x {r['seq_len']}" if r["unit"] == "tokens" else f"{r['batch']} images"
        base = first.setdefault((r["preset"], r["attention"]), r["per_second"])
        print(f"| {r['preset']} | {r['model']} | {r['attention']} | {r['allocator']} | {r['adamw']} | {shape} "
              f"| {r['per_second']:,.0f} {r['unit']}/s | {r['seconds']:.1f} | {r['per_second'] / base:.2f}x |")
    if args.json:
        run.write(args.json, rows)


if __name__ == "__main__":
    main()
