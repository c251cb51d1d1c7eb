"""FP32 vs INT8 latency of every CPU path, per model size, in one interleaved run (random weights and inputs: the
cost does not depend on them; quality is measured by ``quantizable export``).

Paths: PyTorch FP32 eager, PyTorch FP32 ``torch.compile`` (freezing), ORT FP32; PT2E INT8 (X86InductorQuantizer,
compiled) and ORT INT8 (QDQ, per-tensor). All are timed on the same batch with the same thread count, interleaved so
that load from other processes hits them alike; medians are reported, and every speed-up (over the same backend's
FP32, over the fastest FP32 path, PT2E vs ORT INT8) is the median of per-round ratios.

    python benchmarks/bench_int8.py [--models bert-256 opt-768] [--method vanilla] [--batch-size 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import BenchmarkRun, ort_gemm_limit_calls, paired_ratio
from quantizable.export import cpu_flags, ort_int8
from quantizable.export.onnx import weight_type
from quantizable.export.common import input_names, latency_samples_ms
from quantizable.export.pt2e import pt2e_int8
from quantizable.models import MODEL_PRESETS, create_model

# name -> (preset, config overrides): the repository's small presets and two sizes where INT8 GEMMs dominate
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-tiny": ("opt-tiny", {}),
    "bert-small": ("bert-small", {}),
    "vit-small": ("vit-small", {}),
    "bert-256": ("bert-small", {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}),
    "opt-256": ("opt-small", {"hidden_size": 256, "word_embed_proj_dim": 256, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "ffn_dim": 1024}),
    "bert-768": ("bert-6l", {}),
    "opt-768": ("opt-125m", {"num_hidden_layers": 6}),
}
FP32_PATHS = ("fp32_eager", "fp32_compiled", "fp32_ort")
INT8_PATHS = ("int8_pt2e", "int8_ort")


def _batch(model, family: str, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        size, channels = model.config.image_size, model.config.num_channels
        return {"pixel_values": torch.randn(batch_size, channels, size, size, generator=g)}
    ids = torch.randint(model.config.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _eager(model):
    def logits(batch):
        with torch.no_grad():
            return model(**batch).logits

    return logits


def bench(name: str, method: str, batch_size: int, seq_len: int, threads: int, repeats: int) -> list[dict[str, Any]]:
    """One row per INT8 backend (``backend``, ``fp32_ms``/``int8_ms``/``speedup`` against the same backend's FP32,
    file sizes) with every path's latency from the same interleaved run and the speedup over the fastest FP32."""
    preset, overrides = MODELS[name]
    family = MODEL_PRESETS[preset][0]
    model = create_model(preset, spec_for_method(method), **overrides).eval()
    batch = _batch(model, family, batch_size, seq_len, seed=0)
    calibration = [_batch(model, family, batch_size, seq_len, seed=s) for s in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backends = {"onnxruntime": ort_int8(model, calibration, batch, Path(tmp) / "ort", threads),
                    "pt2e": pt2e_int8(model, calibration, batch, Path(tmp) / "pt2e")}
        sizes = {backend: {f"{k}_mb": (Path(tmp) / ("ort" if backend == "onnxruntime" else "pt2e") / f).stat().st_size
                           / 2**20 for k, f in files.items()} for backend, (_, files) in backends.items()}
        ort, pt2e = backends["onnxruntime"][0], backends["pt2e"][0]
        functions = {"fp32_eager": _eager(model), "fp32_compiled": pt2e["fp32"], "fp32_ort": ort["fp32"],
                     "int8_pt2e": pt2e["int8"], "int8_ort": ort["int8"]}
        started = time.perf_counter()
        for function in (pt2e["fp32"], pt2e["int8"]):  # compile outside the timed runs
            function(batch)
        compile_s = time.perf_counter() - started
        # the GEMM limit in the same interleaved run: one ORT GEMM at the model's FFN-up shape (tokens x d -> 4d),
        # FP32 vs INT8 with the weight type the INT8 model has (u8 on a CPU without VNNI, where u8 x s8 saturates)
        hidden = model.config.hidden_size
        tokens = batch_size * (seq_len if "input_ids" in input_names(batch)
                               else (model.config.image_size // model.config.patch_size) ** 2 + 1)
        gemm = ort_gemm_limit_calls(Path(tmp), tokens, hidden, 4 * hidden, threads,
                                    unsigned_weights=weight_type().name == "QUInt8")
        functions.update({name: (lambda _, call=call: call()) for name, call in gemm.items()})
        samples = latency_samples_ms(functions, batch, repeats=repeats)
    limit = paired_ratio(samples, "gemm_fp32", "gemm_int8")["median"]
    latency = {name: statistics.median(values) for name, values in samples.items()}
    fastest = min(FP32_PATHS, key=latency.get)
    common = {"model": name, "preset": preset, "overrides": overrides, "method": method,
              "parameters": sum(p.numel() for p in model.parameters()),
              "batch": {k: list(v.shape) for k, v in batch.items()}, "threads": threads, "cpu_flags": cpu_flags(),
              "repeats": repeats, "latency_ms": latency, "fastest_fp32": fastest,
              "gemm_limit": {"shape": [tokens, hidden, 4 * hidden], "weights": weight_type().name, "limit": limit}}
    same = {"onnxruntime": ("fp32_ort", "int8_ort"), "pt2e": ("fp32_compiled", "int8_pt2e")}
    return [{**common, "backend": backend, "fp32_ms": latency[fp32], "int8_ms": latency[int8],
             "speedup": paired_ratio(samples, fp32, int8)["median"],
             "speedup_vs_fastest_fp32": paired_ratio(samples, fastest, int8)["median"],
             "share_of_gemm_limit": paired_ratio(samples, fastest, int8)["median"] / limit,
             "pt2e_vs_ort_int8": paired_ratio(samples, "int8_pt2e", "int8_ort"),
             **sizes[backend], **({"compile_s": compile_s} if backend == "pt2e" else {})}
            for backend, (fp32, int8) in same.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = BenchmarkRun("int8", {k: v for k, v in vars(args).items() if k != "out"})
    rows = []
    for name in args.models:
        pair = bench(name, args.method, args.batch_size, args.seq_len, args.threads, args.repeats)
        ms = pair[0]["latency_ms"]
        print(f"{name:10s} " + "  ".join(f"{path} {ms[path]:8.2f}" for path in (*FP32_PATHS, *INT8_PATHS))
              + f"  | vs fastest FP32 ({pair[0]['fastest_fp32']}): "
              + "  ".join(f"{row['backend']} {row['speedup_vs_fastest_fp32']:.2f}x "
                          f"({row['share_of_gemm_limit']:.0%} of limit)" for row in pair)
              + f"  | same-run GEMM limit {pair[0]['gemm_limit']['limit']:.2f}x  flags {run.machine['cpu_flags']}",
              flush=True)
        rows += pair
        run.write(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
