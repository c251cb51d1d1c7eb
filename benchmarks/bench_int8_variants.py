"""What our attention variants cost in real INT8: vanilla vs clipped softmax vs gated attention, ONNX Runtime FP32 and
INT8 (``export --int8``'s recipe), BERT / OPT / Llama at d = 256 and 768, batch 8 x 128 and 1 x 128, 1 and 2 threads.

For each family and width the three methods' six sessions per thread count are timed **interleaved in one run**, and
every ratio ("variant INT8 / vanilla INT8", "FP32 / INT8") is the median (and quartiles) of per-round ratios, so it
compares like with like on a shared CPU whose speed drifts. Random weights
and inputs (latency does not depend on them); quality on trained models is ``quantizable export``'s job (docs/int8.md).
Also recorded per artefact: file size, the resident memory a fresh process adds by loading the session and its peak
after one batch of 1 x 128 (in a child process, so that the artefacts do not share an allocator), and the INT8
logits' relative error against FP32 on the timed batch (a sanity check that the graph is not broken, not quality).

    python benchmarks/bench_int8_variants.py [--families bert opt llama] [--widths 256 768] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun, model_geometry, paired_ratio, random_ids
from quantizable.export.common import latency_samples_ms
from quantizable.export.onnx import export_onnx, ort_logits, quantize_onnx, session
from quantizable.models import create_model

METHODS = ("vanilla", "clipped_softmax", "gated_attention")
PRECISIONS = ("fp32", "int8")
SEQ_LEN = 128
# batch size -> timed repeats (batch 1 is ~8x faster, so more repeats cost the same time)
BATCHES = {8: 12, 1: 30}


# A fresh interpreter: RSS after importing ORT, after loading the session, and the peak after running one batch.
_RSS_PROBE = """
import sys, numpy as np, onnxruntime as ort
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
base = kib("VmRSS:")
options = ort.SessionOptions(); options.intra_op_num_threads = 1; options.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
loaded = kib("VmRSS:") - base
ids = np.random.default_rng(0).integers(0, int(sys.argv[2]), size=(int(sys.argv[3]), %d), dtype=np.int64)
s.run(None, {"attention_mask": np.ones_like(ids), "input_ids": ids})
print(loaded, kib("VmHWM:") - base)
""" % SEQ_LEN


def resident_mb(path: Path, vocab: int, batch_size: int = 1) -> dict[str, float]:
    """Resident memory (MiB) a fresh process adds by loading ``path`` (``loaded``: weights, prepacked copies) and its
    peak after running one batch of ``batch_size`` (``peak``: plus activations and the logits; Linux only)."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(vocab), str(batch_size)], check=True,
                         capture_output=True, text=True).stdout
    loaded, peak = (int(value) / 1024 for value in out.split()[-2:])
    return {"loaded": loaded, "peak_batch1": peak}


def bench(family: str, width: int, layers: int, threads: list[int]) -> list[dict[str, Any]]:
    preset, overrides = model_geometry(family, width, layers, SEQ_LEN)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[tuple[str, str], Path] = {}
        for method in METHODS:
            model = create_model(preset, spec_for_method(method), **overrides).eval()
            vocab = model.config.vocab_size
            calibration = [random_ids(vocab, 8, SEQ_LEN, seed) for seed in range(1, 5)]
            started = time.perf_counter()
            fp32 = export_onnx(model, calibration[0], Path(tmp) / f"{method}.fp32.onnx")
            int8 = quantize_onnx(fp32, Path(tmp) / f"{method}.int8.onnx", calibration)
            paths[method, "fp32"], paths[method, "int8"] = fp32, int8
            check = random_ids(vocab, 8, SEQ_LEN, 0)
            reference = ort_logits(session(fp32))(check)
            error = float((ort_logits(session(int8))(check) - reference).norm() / reference.norm())
            rows[method] = {"family": family, "width": width, "layers": layers, "preset": preset,
                            "overrides": overrides, "method": method, "vocab": vocab,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "export_s": time.perf_counter() - started, "int8_logits_relative_error": error,
                            **{f"{p}_file_mb": paths[method, p].stat().st_size / 2**20 for p in PRECISIONS},
                            **{f"{p}_resident_mb": resident_mb(paths[method, p], vocab) for p in PRECISIONS},
                            "latency_ms": {}}
            print(f"  {family}-{width} {method}: exported in {rows[method]['export_s']:.0f} s, INT8 logits error "
                  f"{error:.3f}", flush=True)
        for count in threads:
            sessions = {f"{method}/{p}": ort_logits(session(paths[method, p], count))
                        for method in METHODS for p in PRECISIONS}
            for batch_size, repeats in BATCHES.items():
                batch = random_ids(vocab, batch_size, SEQ_LEN, 0)
                samples = latency_samples_ms(sessions, batch, repeats=repeats, warmup=2)
                setting = f"batch{batch_size}_threads{count}"
                for method in METHODS:
                    fp32, int8 = f"{method}/fp32", f"{method}/int8"
                    rows[method]["latency_ms"][setting] = {
                        "fp32": statistics.median(samples[fp32]), "int8": statistics.median(samples[int8]),
                        "int8_speedup": paired_ratio(samples, fp32, int8),
                        "fp32_vs_vanilla": paired_ratio(samples, fp32, "vanilla/fp32"),
                        "int8_vs_vanilla": paired_ratio(samples, int8, "vanilla/int8")}
                print(f"  {family}-{width} {setting} (FP32 / INT8 ms, INT8 vs vanilla INT8 per round): " + "  ".join(
                    f"{m} {statistics.median(samples[f'{m}/fp32']):.1f} / {statistics.median(samples[f'{m}/int8']):.1f}"
                    f" ({rows[m]['latency_ms'][setting]['int8_vs_vanilla']['median']:.3f}x)" for m in METHODS),
                      flush=True)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["bert", "opt", "llama"], choices=["bert", "opt", "llama"])
    parser.add_argument("--widths", nargs="+", type=int, default=[256, 768])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_variants.json")
    args = parser.parse_args()
    if any(width % 64 for width in args.widths):
        parser.error("--widths must be multiples of 64 (heads of 64)")
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs every LayerNorm bias through the root logger
    warnings.simplefilter("ignore")  # the tracer warns about every Python-level shape check
    run = BenchmarkRun("int8_variants", {"threads": args.threads, "seq_len": SEQ_LEN, "batches": BATCHES,
                                         "layers": args.layers})
    rows: list[dict[str, Any]] = []
    for family in args.families:
        for width in args.widths:
            rows += bench(family, width, args.layers, args.threads)
            run.write(args.out, rows)
    print(f"wrote {args.out}")
    print(json.dumps({f"{r['family']}-{r['width']} {r['method']}": round(
        r["latency_ms"][f"batch8_threads{args.threads[0]}"]["int8_vs_vanilla"]["median"], 3) for r in rows}))


if __name__ == "__main__":
    main()
