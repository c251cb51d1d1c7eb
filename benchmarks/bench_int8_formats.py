"""Which ONNX Runtime INT8 recipe is fastest for our exported graphs: graph fusion before quantization, QDQ vs
QOperator, per-tensor vs per-channel weights, U8 vs S8 activations. One interleaved run per model, one thread,
random weights and inputs (latency does not depend on them); ratios are against the fastest FP32 path of the same
run (PyTorch eager, ORT FP32, ORT FP32 after the transformer optimizer's fusions).

    python benchmarks/bench_int8_formats.py [--models bert-256 opt-256] [--method vanilla] [--repeats 15]

Variants that ONNX Runtime fails to quantize are reported with the error instead of a time.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.transformers import optimizer

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun
from quantizable.export import cpu_flags, median_latencies_ms
from quantizable.export.onnx import CalibrationReader, export_onnx, masked_nodes, ort_logits, session
from quantizable.models import create_model
from quantizable.models.families import attention_geometry

# name -> (preset, overrides, the optimizer's model type for the fusions)
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "bert-256": ("bert-small", {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}, "bert"),
    "opt-256": ("opt-small", {"hidden_size": 256, "word_embed_proj_dim": 256, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "ffn_dim": 1024}, "gpt2"),
    "bert-768": ("bert-6l", {}, "bert"),
    "opt-768": ("opt-125m", {"num_hidden_layers": 6}, "gpt2"),
}
MATMULS = ["MatMul", "Gemm"]
# name -> (fused graph?, format, per-channel, activation type, op types to quantize; None: every op ORT knows)
VARIANTS = {
    "int8_qdq": (False, QuantFormat.QDQ, False, QuantType.QUInt8, None),  # today's export
    "int8_qdq_matmul": (False, QuantFormat.QDQ, False, QuantType.QUInt8, MATMULS),
    "int8_fused_qdq_matmul": (True, QuantFormat.QDQ, False, QuantType.QUInt8, MATMULS),
    "int8_fused_qoperator_matmul": (True, QuantFormat.QOperator, False, QuantType.QUInt8, MATMULS),
    "int8_fused_qdq_matmul_per_channel": (True, QuantFormat.QDQ, True, QuantType.QUInt8, MATMULS),
    "int8_fused_qdq_matmul_s8": (True, QuantFormat.QDQ, False, QuantType.QInt8, MATMULS),
}


def _batch(seed: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(vocab, (8, 128), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench(name: str, method: str, repeats: int) -> dict[str, Any]:
    preset, overrides, model_type = MODELS[name]
    model = create_model(preset, spec_for_method(method), **overrides).eval()
    hidden, heads, _ = attention_geometry(model.config)
    batch, calibration = _batch(0, 1000), [_batch(seed, 1000) for seed in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        directory = Path(tmp)
        fp32 = export_onnx(model, batch, directory / "fp32.onnx")
        optimized = optimizer.optimize_model(str(fp32), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                             opt_level=1, use_gpu=False)
        optimized.save_model_to_file(str(directory / "fused.onnx"))
        fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
        paths, errors = {"fp32_ort": fp32, "fp32_ort_fused": directory / "fused.onnx"}, {}
        for variant, (fused, fmt, per_channel, activations, ops) in VARIANTS.items():
            source, target = paths["fp32_ort_fused" if fused else "fp32_ort"], directory / f"{variant}.onnx"
            try:
                quantize_static(str(source), str(target), CalibrationReader(calibration), quant_format=fmt,
                                activation_type=activations, weight_type=QuantType.QInt8, per_channel=per_channel,
                                op_types_to_quantize=ops, calibrate_method=CalibrationMethod.MinMax,
                                nodes_to_exclude=masked_nodes(source, calibration))
                paths[variant] = target
            except Exception as error:  # an ORT quantizer failure is a result of this benchmark, not a crash
                errors[variant] = f"{type(error).__name__}: {error}"[:200]
        functions = {key: ort_logits(session(path, 1)) for key, path in paths.items()}
        functions["fp32_eager"] = lambda inputs: model(**inputs).logits
        latency = median_latencies_ms(functions, batch, repeats=repeats)
    fastest = min(("fp32_eager", "fp32_ort", "fp32_ort_fused"), key=latency.get)
    return {"model": name, "method": method, "batch": [8, 128], "threads": 1, "cpu_flags": cpu_flags(),
            "fusions": fusions,
            "latency_ms": latency, "fastest_fp32": fastest,
            "speedup_vs_fastest_fp32": {k: latency[fastest] / v for k, v in latency.items()}, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-256", "opt-256"], choices=list(MODELS))
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_formats.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = BenchmarkRun("int8_formats", {k: v for k, v in vars(args).items() if k != "out"})
    rows = []
    for name in args.models:
        row = bench(name, args.method, args.repeats)
        rows.append(row)
        run.write(args.out, rows)
        print(f"{name} (fusions {row['fusions']}; fastest FP32: {row['fastest_fp32']})")
        for key, ms in row["latency_ms"].items():
            print(f"  {key:36s} {ms:8.1f} ms  {row['speedup_vs_fastest_fp32'][key]:.2f}x")
        for key, error in row["errors"].items():
            print(f"  {key:36s} failed: {error}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
