"""Cost of every attention kind per training step, as a ratio to vanilla attention on SDPA (docs/performance.md).

For small BERT / OPT / ViT models, one model per kind (``spec_for_method`` defaults) with the same weights and
batch; full training steps (forward, backward, the trainer's fused AdamW) interleaved round-robin with the order
rotated every round, so that a shared machine's slow phases hit all kinds alike. The clock is this process's CPU
time on CPU (one torch thread), wall time on CUDA; the reported number is each kind's median step over vanilla's.
Reuses the step, clock and batch conventions of ``bench_attention_cost.py`` (attention dropout 0, one padded
sequence).

    python benchmarks/bench_attention_kinds.py                  # ~3 min on 1 CPU thread
    python benchmarks/bench_attention_kinds.py --lengths 128 512 --seconds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench_attention_cost import PRESETS, Variant, make_step, timing
from quantizable.attention import KINDS, spec_for_method
from quantizable.benchmarking import BenchmarkRun, interleaved_times
from quantizable.models import apply_attention_spec, create_model
from quantizable.training.allocator import keep_freed_memory

RESULTS = Path(__file__).parent / "results" / "attention_kinds.json"


def measure(preset: str, seq_len: int, batch: int, steps: int, seconds: float,
            device: torch.device) -> list[dict[str, Any]]:
    """Median training-step time of every kind on one (model, length), interleaved."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if preset.startswith("vit"):  # a (4 x seq_len/4)-patch image: seq_len patches plus the CLS token
        base = create_model(preset, image_size=(16, seq_len // 4 * 4))
        inputs = {"pixel_values": torch.randn(batch, 1, 16, seq_len // 4 * 4, generator=g),
                  "labels": torch.randint(0, 10, (batch,), generator=g)}
    else:
        dropout = {"attention_probs_dropout_prob": 0.0} if preset.startswith("bert") else {"attention_dropout": 0.0}
        base = create_model(preset, max_position_embeddings=seq_len, **dropout)
        ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, -seq_len // 4:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    variants = [Variant(kind, spec_for_method(kind)) for kind in KINDS]
    steps_of = {v.name: make_step(apply_attention_spec(base, v.spec).to(device).train(), inputs, v) for v in variants}
    times = interleaved_times(steps_of, steps, 1, seconds, **timing(device))  # vanilla (KINDS[0]) first
    base_ms = 1000 * statistics.median(times["vanilla"])
    return [{"model": preset, "length": seq_len, "batch": batch, "kind": name, "steps": len(t),
             "step_ms": 1000 * statistics.median(t), "time_ratio": 1000 * statistics.median(t) / base_ms}
            for name, t in times.items()]


def table(rows: list[dict[str, Any]]) -> str:
    groups = sorted({(r["model"], r["length"]) for r in rows}, key=lambda g: (PRESETS.index(g[0]), g[1]))
    lines = ["| kind | " + " | ".join(f"{m} T={t}" for m, t in groups) + " |", "|---|" + "---:|" * len(groups)]
    ratio = {(r["model"], r["length"], r["kind"]): r["time_ratio"] for r in rows}
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{ratio[m, t, kind]:.2f}" for m, t in groups) + " |")
    vanilla = {(r["model"], r["length"]): r["step_ms"] for r in rows if r["kind"] == "vanilla"}
    lines.append("| (vanilla step ms) | " + " | ".join(f"{vanilla[g]:.0f}" for g in groups) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch: batch = max(1, tokens // T)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per kind, at least")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="more rounds until vanilla's timed steps of a group add up to this many seconds")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=PRESETS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = torch.device(args.device)
    run = BenchmarkRun("attention_kinds", {"device": str(device), "threads": args.threads, "steps": args.steps,
                                           "seconds": args.seconds, "tokens": args.tokens})
    start = time.perf_counter()
    rows = []
    for preset in args.presets:
        for seq_len in args.lengths:
            rows += measure(preset, seq_len, max(1, args.tokens // seq_len), args.steps, args.seconds, device)
            print(f"# {preset} T={seq_len}: {rows[-1]['steps']} steps per kind "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print("## training step time / vanilla SDPA\n" + table(rows))
    result = run.write(args.out, rows)
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
