"""What exact INT8 GEMMs cost where the CPU lacks VNNI: ONNX Runtime INT8 with signed weights (u8 x s8, which
saturates there) vs unsigned weights with zero point 128 (u8 x u8, exact; ``quantize_onnx``'s default on such CPUs),
beside FP32. d=256, 4 layers (``benchmarking.model_geometry``), vanilla, random weights, batch 8 x 128, one thread,
interleaved; the cost is the median [quartiles] of per-round ratios. Also the INT8 logits' relative error vs FP32.

    python benchmarks/bench_int8_weight_types.py [--families bert opt llama] [--repeats 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

from onnxruntime.quantization import QuantType

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun, model_geometry, paired_ratio, random_ids
from quantizable.export.common import latency_samples_ms
from quantizable.export.onnx import export_onnx, ort_logits, quantize_onnx, session
from quantizable.models import create_model

SEQ_LEN = 128

WEIGHTS = (QuantType.QInt8, QuantType.QUInt8)


def bench(family: str, repeats: int) -> dict[str, Any]:
    preset, overrides = model_geometry(family, 256, 4, SEQ_LEN)
    model = create_model(preset, spec_for_method("vanilla"), **overrides).eval()
    vocab = model.config.vocab_size
    calibration = [random_ids(vocab, 8, SEQ_LEN, seed) for seed in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, calibration[0], Path(tmp) / "fp32.onnx")
        functions = {"fp32": ort_logits(session(fp32))}
        for weights in WEIGHTS:
            path = quantize_onnx(fp32, Path(tmp) / f"{weights.name}.onnx", calibration, weights=weights)
            functions[weights.name] = ort_logits(session(path))
        batch = random_ids(vocab, 8, SEQ_LEN, 0)
        reference = functions["fp32"](batch)
        error = {name: float((function(batch) - reference).norm() / reference.norm())
                 for name, function in functions.items() if name != "fp32"}
        samples = latency_samples_ms(functions, batch, repeats=repeats, warmup=2)
    return {"family": family, "preset": preset, "overrides": overrides,
            "latency_ms": {name: statistics.median(values) for name, values in samples.items()},
            "exact_vs_saturating": paired_ratio(samples, "QUInt8", "QInt8"),
            "exact_speedup_vs_fp32": paired_ratio(samples, "fp32", "QUInt8"),
            "int8_logits_relative_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["bert", "opt", "llama"], choices=["bert", "opt", "llama"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_weight_types.json")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs every LayerNorm bias through the root logger
    warnings.simplefilter("ignore")  # the tracer warns about every Python-level shape check
    run = BenchmarkRun("int8_weight_types", {"families": args.families, "repeats": args.repeats})
    rows = []
    for family in args.families:
        row = bench(family, args.repeats)
        rows.append(row)
        run.write(args.out, rows)
        ms, cost = row["latency_ms"], row["exact_vs_saturating"]
        print(f"{family}: FP32 {ms['fp32']:.1f} ms, INT8 signed {ms['QInt8']:.1f} ms, unsigned {ms['QUInt8']:.1f} ms;"
              f" exact / saturating {cost['median']:.3f} [{cost['q1']:.2f}-{cost['q3']:.2f}]", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
