"""Where real INT8 time goes (issue 34): ONNX Runtime's per-operator profile of the FP32 and INT8 graphs of BERT and
OPT, grouped as linear GEMMs, attention matmuls, softmax, norms, Q/DQ and requantisation, embeddings/gather, head (with its
bias add) and the rest (elementwise ops, GELU, masks, reshapes), one table per model with the CPU flags.

Each graph runs ``--runs`` times in a session with ``enable_profiling``; the trace's node events (the optimised
graph's nodes, fusions included) are summed per category and divided by the runs. A node is a linear GEMM when one
of its inputs is a weight (an initializer, or a DequantizeLinear of one), the head when that weight has the
vocabulary as a dimension, an attention matmul when no input is a weight. Profiling adds a little per node; the
shares, not the absolute times, are the figure.

    python benchmarks/bench_int8_profile.py [--models bert-256 opt-256 bert-768 opt-768] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun, model_geometry, random_ids
from quantizable.export.onnx import export_onnx, feeds, quantize_onnx
from quantizable.models import create_model

CATEGORIES = ("linear", "attention_matmul", "softmax", "norm", "qdq", "embedding", "head", "other")
GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QGemm", "QAttention", "Attention", "MultiHeadAttention"}
NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "QLinearLayerNormalization"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RequantizeLinear"}
EMBEDDING_OPS = {"Gather", "EmbedLayerNormalization", "GatherElements"}


def _categorise(graph: onnx.GraphProto, vocab: int) -> dict[str, str]:
    """Node name -> category of the optimised graph."""
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    dequantized = {node.output[0]: initializers[node.input[0]] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in initializers}
    weights = {**initializers, **dequantized}
    category = {}
    for node in graph.node:
        op = node.op_type
        if op in GEMM_OPS:
            dims = [weights[name] for name in node.input if name in weights and len(weights[name]) >= 2]
            category[node.name] = ("head" if any(vocab in d for d in dims) else "linear") if dims \
                else "attention_matmul"
        elif op in ("Softmax", "QLinearSoftmax"):
            category[node.name] = "softmax"
        elif op in NORM_OPS:
            category[node.name] = "norm"
        elif op in QDQ_OPS:
            category[node.name] = "qdq"
        elif op in EMBEDDING_OPS:
            category[node.name] = "embedding"
        else:
            category[node.name] = "other"
    head_outputs = {name for node in graph.node if category[node.name] == "head" for name in node.output}
    for node in graph.node:  # the head's separate bias add (BERT) belongs to the head
        if node.op_type == "Add" and head_outputs.intersection(node.input):
            category[node.name] = "head"
    return category


def profile(path: Path, batch: dict[str, torch.Tensor], vocab: int, runs: int, threads: int,
            level: ort.GraphOptimizationLevel) -> dict[str, Any]:
    """ms per forward pass per category (and per op type) from ORT's profiler, over ``runs`` passes after one
    untimed warm-up."""
    optimised = path.with_suffix(".opt.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # writes the optimised graph
    category = _categorise(onnx.load(str(optimised)).graph, vocab)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.graph_optimization_level = level
    options.enable_profiling, options.profile_file_prefix = True, str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = feeds(batch)
    session.run(None, inputs)
    for _ in range(runs):
        session.run(None, inputs)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kept = runs_seen[-runs:]
    start = kept[0]["ts"]
    per_category: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < start:
            continue
        node = event["name"][: -len("_kernel_time")]
        op = event.get("args", {}).get("op_name", "?")
        per_category[category.get(node, "other")] += event["dur"] / 1000 / runs
        per_op[op] += event["dur"] / 1000 / runs
    total_run = sum(e["dur"] for e in kept) / 1000 / runs
    return {"run_ms": total_run, "nodes_ms": sum(per_category.values()),
            "category_ms": {c: per_category.get(c, 0.0) for c in CATEGORIES},
            "op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def bench(name: str, method: str, batch_size: int, seq_len: int, threads: int, runs: int,
          level: ort.GraphOptimizationLevel) -> dict[str, Any]:
    family, width = name.split("-")
    preset, overrides = model_geometry(family, int(width), layers=4 if width == "256" else 6, seq_len=seq_len)
    model = create_model(preset, spec_for_method(method), **overrides).eval()
    vocab = model.config.vocab_size
    batch = random_ids(vocab, batch_size, seq_len, seed=0)
    calibration = [random_ids(vocab, batch_size, seq_len, seed=s) for s in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = export_onnx(model, batch, Path(tmp) / "model.fp32.onnx")
        int8 = quantize_onnx(fp32, Path(tmp) / "model.int8.onnx", calibration)
        graphs = {kind: profile(path, batch, vocab, runs, threads, level) for kind, path in
                  (("fp32", fp32), ("int8", int8))}
    return {"model": name, "preset": preset, "overrides": overrides, "method": method,
            "batch": [batch_size, seq_len], "threads": threads, "runs": runs, **graphs,
            "speedup": graphs["fp32"]["run_ms"] / graphs["int8"]["run_ms"],
            "category_speedup": {c: (graphs["fp32"]["category_ms"][c] / graphs["int8"]["category_ms"][c]
                                     if graphs["int8"]["category_ms"][c] > 0 else None) for c in CATEGORIES}}


def table(row: dict[str, Any], flags: list[str]) -> str:
    fp32, int8 = row["fp32"], row["int8"]
    lines = [f"{row['model']} (batch {row['batch'][0]} x {row['batch'][1]}, {row['threads']} thread(s), "
             f"CPU flags {' '.join(flags) or 'none'}): run FP32 {fp32['run_ms']:.1f} ms, INT8 {int8['run_ms']:.1f} ms "
             f"-> {row['speedup']:.2f}x",
             f"  {'category':17s} {'FP32 ms':>9s} {'share':>6s} {'INT8 ms':>9s} {'share':>6s} {'FP32/INT8':>9s}"]
    for c in CATEGORIES:
        a, b = fp32["category_ms"][c], int8["category_ms"][c]
        ratio = f"{a / b:8.2f}x" if b > 0 and a > 0 else "        -"
        lines.append(f"  {c:17s} {a:9.1f} {a / fp32['nodes_ms']:6.1%} {b:9.1f} {b / int8['nodes_ms']:6.1%} {ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-256", "opt-256", "bert-768", "opt-768"])
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--level", default="all", choices=["basic", "extended", "all"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_profile.json")
    args = parser.parse_args()
    level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[args.level]
    torch.set_num_threads(args.threads)
    run = BenchmarkRun("int8_profile", {k: v for k, v in vars(args).items() if k != "out"})
    rows = []
    for name in args.models:
        row = bench(name, args.method, args.batch_size, args.seq_len, args.threads, args.runs, level)
        rows.append(row)
        run.write(args.out, rows)
        print(table(row, run.machine["cpu_flags"]), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
