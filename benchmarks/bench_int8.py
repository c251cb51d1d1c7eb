"""FP32 vs INT8 latency of every CPU path, per model size, in one interleaved run (random weights and inputs: the
cost does not depend on them; quality is measured by ``quantizable export``).

Paths: PyTorch FP32 eager, PyTorch FP32 ``torch.compile`` (freezing), ORT FP32; PT2E INT8 (X86InductorQuantizer,
compiled) and ORT INT8 (QDQ, per-tensor). All are timed on the same batch with the same thread count, interleaved so
that load from other processes hits them alike; medians are reported, and every speed-up (over the same backend's
FP32, over the fastest FP32 path, PT2E vs ORT INT8) is the median of per-round ratios.

The same-run GEMM limit: one ORT GEMM in FP32 and in INT8 of each 8-bit kernel kind (``--gemm-kinds``: u8 x u8, the
exact kind an INT8 model uses on a CPU without VNNI; u8 x s8, the fastest kind, which saturates there), timed in the
same rounds at two shapes: the FFN-up GEMM (tokens x d -> 4d) and the vocabulary head (tokens x d -> vocabulary).
Limits: ``ffn_up`` (FP32 / INT8 time of that GEMM, the issue-34 definition), ``head``, and ``mix``: the model's own
weight-GEMM mix (every Linear but the head taken at the FFN-up rate, the head at the head rate, weighted by their
multiply-accumulates), each per kind and for the fastest kind of each round (``best``). Each share (``shares``) is
(INT8 speed-up over the fastest FP32 path) / limit; ``share_of_gemm_limit`` is the one against the FFN-up limit of the
kind the row's model runs (``limit_kind``). ``--saturating`` also times ORT INT8 with signed weights (u8 x s8, not
exact without VNNI) in the same rounds: how much of the gap the exactness choice costs end to end. With one thread
the default clock is this process's CPU time (``--clock cpu``: other processes on the shared CPU do not stretch it;
cache and memory contention still do), with more threads wall time.

    python benchmarks/bench_int8.py [--models bert-256 opt-768] [--method vanilla] [--batch-size 8] [--seq-len 128]
        [--gemm-kinds u8u8 u8s8] [--saturating]
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
from onnxruntime.quantization import QuantType

from quantizable.attention.spec import spec_for_method
from quantizable.benchmarking import GEMM_KINDS, BenchmarkRun, ort_gemm_limit_calls, paired_ratio
from quantizable.export import cpu_flags, ort_int8
from quantizable.export.onnx import ort_logits, quantize_onnx, session, weight_type
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


def _model_kind() -> str:
    """The GEMM kind this CPU's INT8 models run (``quantize_onnx``'s weight type): u8 x u8 without VNNI."""
    return "u8u8" if weight_type() == QuantType.QUInt8 else "u8s8"


def _gemm_macs(model, vocab: int | None) -> tuple[int, int, int | None]:
    """Multiply-accumulates per token of the model's Linear layers but the head, of the head (out = vocabulary),
    and the head's input width (None without a vocabulary head)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    heads = [m for m in linears if vocab is not None and m.out_features == vocab]
    body = sum(m.in_features * m.out_features for m in linears if m not in heads)
    return body, sum(m.in_features * m.out_features for m in heads), (heads[0].in_features if heads else None)


def _limits(samples: dict[str, list[float]], kinds: tuple[str, ...], shapes: dict[str, list[int]],
            macs: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per shape (and the model's ``mix``): FP32 / INT8 time per kind and for the round's fastest kind (``best``),
    medians of per-round ratios. Adds the synthetic ``{shape}_best`` and ``mix_*`` series to ``samples``."""
    for shape in shapes:
        samples[f"{shape}_best"] = [min(values) for values in zip(*(samples[f"{shape}_{k}"] for k in kinds))]
    if "head" in shapes:  # the mix: each GEMM's time scaled to the model's multiply-accumulates on that GEMM kind
        scale = {shape: macs[shape] / (dims[0] * dims[1] * dims[2]) for shape, dims in shapes.items()}
        for kind in ("fp32", *kinds, "best"):
            samples[f"mix_{kind}"] = [sum(scale[shape] * samples[f"{shape}_{kind}"][i] for shape in shapes)
                                      for i in range(len(samples[f"ffn_up_{kind}"]))]
    return {shape: {kind: paired_ratio(samples, f"{shape}_fp32", f"{shape}_{kind}")["median"]
                    for kind in (*kinds, "best")} for shape in (*shapes, *(["mix"] if "head" in shapes else []))}


def bench(name: str, method: str, batch_size: int, seq_len: int, threads: int, repeats: int,
          kinds: tuple[str, ...] = ("u8u8", "u8s8"), saturating: bool = False,
          clock: str = "wall") -> list[dict[str, Any]]:
    """One row per INT8 backend (``backend``, ``fp32_ms``/``int8_ms``/``speedup`` against the same backend's FP32,
    file sizes) with every path's latency from the same interleaved run, the speedup over the fastest FP32, the
    same-run GEMM limits (``gemm_limit``) and the shares of them (``shares``)."""
    preset, overrides = MODELS[name]
    family = MODEL_PRESETS[preset][0]
    model = create_model(preset, spec_for_method(method), **overrides).eval()
    batch = _batch(model, family, batch_size, seq_len, seed=0)
    calibration = [_batch(model, family, batch_size, seq_len, seed=s) for s in range(1, 5)]
    own_kind = _model_kind()
    kinds = tuple(dict.fromkeys((own_kind, *kinds)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backends = {"onnxruntime": ort_int8(model, calibration, batch, Path(tmp) / "ort", threads),
                    "pt2e": pt2e_int8(model, calibration, batch, Path(tmp) / "pt2e")}
        sizes = {backend: {f"{k}_mb": (Path(tmp) / ("ort" if backend == "onnxruntime" else "pt2e") / f).stat().st_size
                           / 2**20 for k, f in files.items()} for backend, (_, files) in backends.items()}
        ort, pt2e = backends["onnxruntime"][0], backends["pt2e"][0]
        functions = {"fp32_eager": _eager(model), "fp32_compiled": pt2e["fp32"], "fp32_ort": ort["fp32"],
                     "int8_pt2e": pt2e["int8"], "int8_ort": ort["int8"]}
        if saturating and own_kind != "u8s8":  # the same graph with signed weights: faster, not exact without VNNI
            path = quantize_onnx(Path(tmp) / "ort" / "model.fp32.onnx", Path(tmp) / "ort" / "model.int8_s8.onnx",
                                 calibration, weights=QuantType.QInt8)
            functions["int8_ort_saturating"] = ort_logits(session(path, threads))
        started = time.perf_counter()
        for function in (pt2e["fp32"], pt2e["int8"]):  # compile outside the timed runs
            function(batch)
        compile_s = time.perf_counter() - started
        # the GEMM limits in the same interleaved run: one ORT GEMM at the model's FFN-up shape (tokens x d -> 4d)
        # and at its vocabulary head, FP32 vs INT8 of each kernel kind
        hidden = model.config.hidden_size
        tokens = batch_size * (seq_len if "input_ids" in input_names(batch)
                               else (model.config.image_size // model.config.patch_size) ** 2 + 1)
        vocab = getattr(model.config, "vocab_size", None) if family != "vit" else None
        body_macs, head_macs, head_in = _gemm_macs(model, vocab)
        shapes = {"ffn_up": [tokens, hidden, 4 * hidden]}
        if head_in is not None:
            shapes["head"] = [tokens, head_in, vocab]
        for shape, (m, k, n) in shapes.items():
            calls = ort_gemm_limit_calls(Path(tmp), m, k, n, threads, kinds=kinds, prefix=shape)
            functions.update({call_name: (lambda _, call=call: call()) for call_name, call in calls.items()})
        samples = latency_samples_ms(functions, batch, repeats=repeats,
                                     clock=time.process_time if clock == "cpu" else time.perf_counter)
    latency = {path: statistics.median(values) for path, values in samples.items()}
    limits = _limits(samples, kinds, shapes, {"ffn_up": tokens * body_macs, "head": tokens * head_macs})
    fastest = min(FP32_PATHS, key=latency.get)
    common = {"model": name, "preset": preset, "overrides": overrides, "method": method,
              "parameters": sum(p.numel() for p in model.parameters()),
              "batch": {k: list(v.shape) for k, v in batch.items()}, "threads": threads, "cpu_flags": cpu_flags(),
              "repeats": repeats, "clock": clock, "latency_ms": latency, "fastest_fp32": fastest,
              "gemm_limit": {"shape": shapes["ffn_up"], "weights": weight_type().name, "kind": own_kind,
                             "limit": limits["ffn_up"][own_kind], "shapes": shapes, "limits": limits,
                             "gemm_macs_per_token": {"body": body_macs, "head": head_macs}}}
    same = {"onnxruntime": ("fp32_ort", "int8_ort"), "pt2e": ("fp32_compiled", "int8_pt2e")}
    if "int8_ort_saturating" in functions:
        same["onnxruntime_saturating"] = ("fp32_ort", "int8_ort_saturating")
    rows = []
    for backend, (fp32, int8) in same.items():
        vs_fastest = paired_ratio(samples, fastest, int8)["median"]
        kind = "u8s8" if backend == "onnxruntime_saturating" else own_kind  # the kind this row's GEMMs run
        rows.append({**common, "backend": backend, "fp32_ms": latency[fp32], "int8_ms": latency[int8],
                     "speedup": paired_ratio(samples, fp32, int8)["median"],
                     "speedup_vs_fastest_fp32": vs_fastest, "limit_kind": kind,
                     "share_of_gemm_limit": vs_fastest / limits["ffn_up"][kind],
                     "shares": {shape: {kind: vs_fastest / limit for kind, limit in per_kind.items()}
                                for shape, per_kind in limits.items()},
                     "pt2e_vs_ort_int8": paired_ratio(samples, "int8_pt2e", "int8_ort"),
                     **sizes.get(backend, {}), **({"compile_s": compile_s} if backend == "pt2e" else {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gemm-kinds", nargs="+", default=["u8u8", "u8s8"], choices=GEMM_KINDS,
                        help="8-bit kernel kinds of the same-run GEMM limit (the model's own kind is always timed)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="wall time, or this process's CPU time (what other processes on a shared CPU do not "
                             "stretch; equal to latency with one thread only); default: cpu with one thread")
    parser.add_argument("--saturating", action="store_true",
                        help="also time ORT INT8 with signed weights (saturating u8 x s8 where the CPU lacks VNNI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    run = BenchmarkRun("int8", {k: v for k, v in vars(args).items() if k != "out"})
    rows = []
    for name in args.models:
        pair = bench(name, args.method, args.batch_size, args.seq_len, args.threads, args.repeats,
                     tuple(args.gemm_kinds), args.saturating, args.clock)
        ms = pair[0]["latency_ms"]
        limits = pair[0]["gemm_limit"]["limits"]
        print(f"{name:10s} " + "  ".join(f"{path} {ms[path]:8.2f}" for path in ms
                                         if path.startswith(("fp32", "int8")))
              + f"  | vs fastest FP32 ({pair[0]['fastest_fp32']}): "
              + "  ".join(f"{row['backend']} {row['speedup_vs_fastest_fp32']:.2f}x "
                          f"({row['share_of_gemm_limit']:.0%} of the {row['limit_kind']} FFN-up limit)"
                          for row in pair)
              + "  | same-run GEMM limits " + "; ".join(
                  f"{shape} " + " ".join(f"{kind} {value:.2f}x" for kind, value in per_kind.items())
                  for shape, per_kind in limits.items())
              + f"  | flags {run.machine['cpu_flags']}", flush=True)
        rows += pair
        run.write(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
