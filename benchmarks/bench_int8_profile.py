"""Where real INT8 time goes (issue 34): per-operator profiles of the FP32 and INT8 models of BERT and OPT on each
backend (``--backends onnxruntime pt2e``), grouped as linear GEMMs, attention matmuls, softmax, norms, Q/DQ and
requantisation, embeddings/gather, head (with its bias add) and the rest (elementwise ops, GELU, masks, reshapes,
framework overhead), one table per model and backend with the CPU flags, and per model the two backends' INT8 side
by side.

**onnxruntime**: ONNX Runtime's profiler.

Each graph runs ``--runs`` times in a session with ``enable_profiling``; the trace's node events (the optimised
graph's nodes, fusions included) are summed per category and divided by the runs. A node is a linear GEMM when one
of its inputs is a weight (an initializer, or a DequantizeLinear of one), the head when that weight has the
vocabulary as a dimension, an attention matmul when no input is a weight. Profiling adds a little per node; the
shares, not the absolute times, are the figure.

**pt2e**: ``torch.profiler`` (CPU, input shapes) on the compiled FP32 and INT8 programs of ``pt2e_int8`` (Inductor
with freezing; ``cpp.enable_kernel_profile`` so that each generated C++ kernel is an event), ``--runs`` passes after
the compiling call and one warm-up. Each event is taken whole where it is a kernel (a GEMM op, ``aten::bmm``, an
Inductor kernel) and by its self time otherwise (framework overhead: ``other``). GEMMs (``onednn::qlinear_pointwise``,
``mkl::_mkl_linear``, ``aten::mm``/``addmm``...) are the head when an input has the vocabulary as a dimension;
``aten::bmm`` is an attention matmul; an Inductor kernel is named after the aten ops it fuses, and goes to the first of
softmax, embedding, norm that its name holds, to Q/DQ when it holds only quantize/dequantize and layout ops, to the
head when it is the bias add right after the head GEMM, else to other. Inductor fuses most quantize/dequantize work
into the neighbouring norm / softmax / embedding kernel (and the requantisation of a GEMM's output into the oneDNN
kernel), so the PT2E Q/DQ category holds only the stand-alone requantisation kernels.

    python benchmarks/bench_int8_profile.py [--models bert-256 opt-256 bert-768 opt-768] [--runs 5]
        [--backends onnxruntime pt2e]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import onnx
import onnxruntime as ort
import torch

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun, model_geometry, random_ids
from quantizable.export.onnx import export_onnx, feeds, quantize_onnx
from quantizable.export.pt2e import pt2e_int8
from quantizable.models import create_model

CATEGORIES = ("linear", "attention_matmul", "softmax", "norm", "qdq", "embedding", "head", "other")
GEMM_OPS = {"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
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


# torch.profiler event names of the compiled PT2E programs (kernels taken whole; see the module docstring)
TORCH_GEMM_OPS = ("onednn::qlinear_pointwise", "mkl::_mkl_linear", "mkldnn::_linear_pointwise", "aten::mm",
                  "aten::addmm", "aten::linear", "onednn::qconv", "mkldnn::_convolution_pointwise")
TORCH_ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_scaled_dot_product")
INDUCTOR_KERNEL = re.compile(r"^(?:graph_\d+_)?(cpp_fused_\w*?)(?:_\d+)?$")
LAYOUT_WORDS = {"quantize", "dequantize", "per", "tensor", "channel", "view", "transpose", "permute", "clone",
                "expand", "unsqueeze", "squeeze", "reshape", "to", "copy", "cat", "select", "slice", "split", "t"}


def _kernel_category(kernel: str) -> str:
    """Category of an Inductor C++ kernel from its name (the aten ops it fuses)."""
    if "softmax" in kernel:
        return "softmax"
    if "embedding" in kernel:
        return "embedding"
    if "layer_norm" in kernel or "rms_norm" in kernel:
        return "norm"
    words = {w for w in kernel.removeprefix("cpp_fused").split("_") if w}
    return "qdq" if words and words <= LAYOUT_WORDS and "quantize" in kernel else "other"


def _torch_category(event: Any, vocab: int) -> tuple[str, str] | None:
    """(category, label) of a profiler event that is a kernel, None for framework events."""
    name = event.name
    if name.startswith(TORCH_GEMM_OPS):
        head = any(vocab in shape for shape in event.input_shapes if isinstance(shape, list))
        return ("head" if head else "linear"), name
    if name.startswith(TORCH_ATTENTION_OPS):
        return "attention_matmul", name
    if name.startswith("aten::embedding"):
        return "embedding", name
    kernel = INDUCTOR_KERNEL.match(name)
    if kernel:
        return _kernel_category(kernel.group(1)), kernel.group(1)
    return None


def profile_pt2e(function: Any, batch: dict[str, torch.Tensor], vocab: int, runs: int) -> dict[str, Any]:
    """ms per forward pass per category (and per op / Inductor kernel) from torch.profiler, over ``runs`` passes
    after the compiling call and one warm-up; ``run_ms`` is the wall time per pass under the profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    function(batch)
    function(batch)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        for _ in range(runs):
            function(batch)
        run_ms = (time.perf_counter() - started) * 1000 / runs
    per_category: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)

    def visit(events: list[Any]) -> None:
        previous = None
        for event in sorted(events, key=lambda e: e.time_range.start):
            kind = _torch_category(event, vocab)
            if kind is None:
                per_category["other"] += event.self_cpu_time_total / 1000 / runs
                per_op[event.name] += event.self_cpu_time_total / 1000 / runs
                visit(event.cpu_children)
                continue
            category, label = kind
            if previous == "head" and label.startswith("cpp_fused") and "addmm" in label:
                category = "head"  # the head's bias add (FP32 BERT), as in the ORT profile
            per_category[category] += event.cpu_time_total / 1000 / runs
            per_op[label] += event.cpu_time_total / 1000 / runs
            previous = category

    visit([event for event in prof.events() if event.cpu_parent is None])
    return {"run_ms": run_ms, "nodes_ms": sum(per_category.values()),
            "category_ms": {c: per_category.get(c, 0.0) for c in CATEGORIES},
            "op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def _row(common: dict[str, Any], backend: str, graphs: dict[str, Any]) -> dict[str, Any]:
    return {**common, "backend": backend, **graphs, "speedup": graphs["fp32"]["run_ms"] / graphs["int8"]["run_ms"],
            "category_speedup": {c: (graphs["fp32"]["category_ms"][c] / graphs["int8"]["category_ms"][c]
                                     if graphs["int8"]["category_ms"][c] > 0 else None) for c in CATEGORIES}}


def bench(name: str, method: str, batch_size: int, seq_len: int, threads: int, runs: int,
          level: ort.GraphOptimizationLevel, backends: tuple[str, ...] = ("onnxruntime",),
          layers: int | None = None) -> list[dict[str, Any]]:
    """One row per backend: the FP32 and INT8 profiles of the same model, batch and calibration. ``name`` is
    ``family-width``; ``layers`` defaults to 4 at d=256 and 6 otherwise (bench_int8's models)."""
    family, width = name.split("-")
    layers = layers or (4 if width == "256" else 6)
    preset, overrides = model_geometry(family, int(width), layers=layers, seq_len=seq_len)
    model = create_model(preset, spec_for_method(method), **overrides).eval()
    vocab = model.config.vocab_size
    batch = random_ids(vocab, batch_size, seq_len, seed=0)
    calibration = [random_ids(vocab, batch_size, seq_len, seed=s) for s in range(1, 5)]
    common = {"model": name, "preset": preset, "overrides": overrides, "method": method,
              "batch": [batch_size, seq_len], "threads": threads, "runs": runs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "onnxruntime" in backends:
            fp32 = export_onnx(model, batch, Path(tmp) / "model.fp32.onnx")
            int8 = quantize_onnx(fp32, Path(tmp) / "model.int8.onnx", calibration)
            rows.append(_row(common, "onnxruntime", {kind: profile(path, batch, vocab, runs, threads, level)
                                                     for kind, path in (("fp32", fp32), ("int8", int8))}))
        if "pt2e" in backends:
            with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
                functions, _ = pt2e_int8(model, calibration, batch, Path(tmp) / "pt2e")
                rows.append(_row(common, "pt2e", {kind: profile_pt2e(functions[kind], batch, vocab, runs)
                                                  for kind in ("fp32", "int8")}))
    return rows


def _category_lines(left: dict[str, Any], right: dict[str, Any], ratio: Callable[[float, float], float]) -> list[str]:
    """One line per category: each side's ms and share of its run, and ``ratio(left_ms, right_ms)``."""
    lines = []
    for c in CATEGORIES:
        x, y = left["category_ms"][c], right["category_ms"][c]
        shown = f"{ratio(x, y):8.2f}x" if x > 0 and y > 0 else "        -"
        lines.append(f"  {c:17s} {x:9.1f} {x / left['nodes_ms']:6.1%} {y:9.1f} {y / right['nodes_ms']:6.1%} {shown}")
    return lines


def table(row: dict[str, Any], flags: list[str]) -> str:
    fp32, int8 = row["fp32"], row["int8"]
    lines = [f"{row['model']} {row.get('backend', 'onnxruntime')} (batch {row['batch'][0]} x {row['batch'][1]}, "
             f"{row['threads']} thread(s), "
             f"CPU flags {' '.join(flags) or 'none'}): run FP32 {fp32['run_ms']:.1f} ms, INT8 {int8['run_ms']:.1f} ms "
             f"-> {row['speedup']:.2f}x",
             f"  {'category':17s} {'FP32 ms':>9s} {'share':>6s} {'INT8 ms':>9s} {'share':>6s} {'FP32/INT8':>9s}"]
    return "\n".join(lines + _category_lines(fp32, int8, lambda x, y: x / y))


def backends_table(rows: list[dict[str, Any]]) -> str:
    """The INT8 profiles of one model on both backends, per category (profiled one after the other, not
    interleaved: the ratios carry the machine's drift between them)."""
    ort_row, pt2e_row = (next(r for r in rows if r.get("backend", "onnxruntime") == b) for b in ("onnxruntime", "pt2e"))
    a, b = ort_row["int8"], pt2e_row["int8"]
    lines = [f"{ort_row['model']} INT8: ORT run {a['run_ms']:.1f} ms, PT2E run {b['run_ms']:.1f} ms "
             f"-> PT2E / ORT {b['run_ms'] / a['run_ms']:.2f}",
             f"  {'category':17s} {'ORT ms':>9s} {'share':>6s} {'PT2E ms':>9s} {'share':>6s} {'PT2E/ORT':>9s}"]
    return "\n".join(lines + _category_lines(a, b, lambda x, y: y / x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-256", "opt-256", "bert-768", "opt-768"])
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--level", default="all", choices=["basic", "extended", "all"])
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: 4 at d=256, 6 otherwise)")
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "pt2e"], choices=["onnxruntime", "pt2e"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_profile.json")
    args = parser.parse_args()
    level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[args.level]
    torch.set_num_threads(args.threads)
    run = BenchmarkRun("int8_profile", {k: v for k, v in vars(args).items() if k != "out"})
    rows = []
    for name in args.models:
        pair = bench(name, args.method, args.batch_size, args.seq_len, args.threads, args.runs, level,
                     tuple(args.backends), args.layers)
        rows += pair
        run.write(args.out, rows)
        for row in pair:
            print(table(row, run.machine["cpu_flags"]), flush=True)
        if len(pair) == 2:
            print(backends_table(pair), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
