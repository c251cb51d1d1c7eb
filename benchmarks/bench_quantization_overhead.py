"""Overhead of the quantization simulator: frozen simulated-W8A8 evaluation time / FP evaluation time.

One run on a small model (default ``bert-small``, random weights and tokens: the cost does not depend on them):
calibrate a quantized copy on a few batches, then time the same evaluation batches on the untouched FP model (SDPA
attention, no hooks) and on the frozen W8A8 copy, interleaved (``quantizable.benchmarking``) so that load from
other processes hits both alike; the median of the per-round ratios is reported and written to
``results/quantization_overhead.json``. Goal: ratio <= 2.

    python benchmarks/bench_quantization_overhead.py [--preset opt-small] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from quantizable.benchmarking import BenchmarkRun, interleaved_times, medians, paired_ratio
from quantizable.evaluation import evaluate
from quantizable.models import MODEL_PRESETS, create_model
from quantizable.quantization import QuantConfig, calibrate, freeze, quantize_


def _batches(preset: str, model, count: int, batch_size: int, seq_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if MODEL_PRESETS[preset][0] == "vit":
        size, channels = model.config.image_size, model.config.num_channels
        return [{"pixel_values": torch.randn(batch_size, channels, size, size, generator=g),
                 "labels": torch.randint(model.config.num_labels, (batch_size,), generator=g)} for _ in range(count)]
    vocab = model.config.vocab_size
    return [{"input_ids": (ids := torch.randint(vocab, (batch_size, seq_len), generator=g)), "labels": ids}
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batches", type=int, default=4, help="evaluation batches per timing (default 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved FP/W8A8 timings (default 5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantization_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = BenchmarkRun("quantization_overhead", {k: v for k, v in vars(args).items() if k != "out"})
    torch.manual_seed(0)
    model = create_model(args.preset).eval()
    calib = _batches(args.preset, model, 4, args.batch_size, args.seq_len, seed=1)
    evaluation = _batches(args.preset, model, args.batches, args.batch_size, args.seq_len)
    quantized_model = copy.deepcopy(model)
    handle = quantize_(quantized_model, QuantConfig())
    calibrate(quantized_model, calib)
    freeze(quantized_model)
    models = {"fp": model, "w8a8": quantized_model}
    calls = {name: (lambda m=m: evaluate(m, evaluation)) for name, m in models.items()}
    times = interleaved_times(calls, args.rounds, warmup=1)
    median, ratio = medians(times), paired_ratio(times, "w8a8", "fp")
    fp_s, q_s = median["fp"], median["w8a8"]
    print(f"{args.preset}: {len(handle.act_quantizers)} activation / {len(handle.weight_quantizers)} weight "
          f"quantizers, {args.batches} batches of {args.batch_size}x{args.seq_len}, 1 thread, median of "
          f"{args.rounds}")
    print(f"FP eval {fp_s:.3f} s, simulated W8A8 eval {q_s:.3f} s, ratio {ratio['median']:.2f} (goal <= 2)")
    run.write(args.out, [{"preset": args.preset, "fp_s": fp_s, "w8a8_s": q_s, "w8a8_over_fp": ratio,
                          "activation_quantizers": len(handle.act_quantizers)}])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
