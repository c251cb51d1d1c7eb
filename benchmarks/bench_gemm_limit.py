"""The limit INT8 inference is compared against: FP32 vs INT8 throughput of one GEMM, per kernel library, at the
shapes our models run (tokens x in -> out). One interleaved run, medians, same thread count for every kernel.

Kernels: FP32 PyTorch ``torch.mm`` (MKL on this build), FP32 ONNX Runtime ``MatMul`` (MLAS), INT8 ONNX Runtime
``MatMulInteger`` (u8 x s8 -> s32, MLAS; what a QDQ MatMul runs with VNNI), the same with u8 weights
(``int8_ort_mlas_u8u8``: what it runs without VNNI, where u8 x s8 saturates), INT8 oneDNN ``qlinear_pointwise``
(u8 x s8 with prepacked weights and FP32 output; what PT2E's Inductor fusion runs) and, with ``--fbgemm``, PyTorch's
older FBGEMM ``quantized::linear`` (u8 x s8, u8 output). The ratio FP32 time / INT8 time of the best kernel of each
kind (``limit``; INT8: the u8 x s8 kernels) is the most an INT8 model can gain from its GEMMs; whatever else the
model runs (softmax, norms, quantize/dequantize, attention in FP32) only lowers it. ``limit_u8u8`` is the same
against MLAS u8 x u8, the exact kind on a CPU without VNNI. The CPU's instruction set is recorded: the 8-bit
dot-product instructions (AVX-512 VNNI / AVX-VNNI) give about 4x the FP32 multiply-accumulate rate, plain AVX2
(``vpmaddubsw`` + ``vpmaddwd``) about 2x.

    python benchmarks/bench_gemm_limit.py [--tokens 1024 128] [--threads 1 2] [--repeats 15] [--fbgemm]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from onnx import TensorProto

from quantizable.benchmarking import BenchmarkRun, ort_single_op
from quantizable.export import cpu_flags, median_latencies_ms

# (name, in, out): the GEMMs of a d=256 / d=768 block and the BERT head (30,522-word vocabulary)
SHAPES: list[tuple[str, int, int]] = [
    ("d256 qkv/out", 256, 256), ("d256 ffn up", 256, 1024), ("d256 ffn down", 1024, 256),
    ("d256 bert head", 256, 30522),
    ("d768 qkv/out", 768, 768), ("d768 ffn up", 768, 3072), ("d768 ffn down", 3072, 768),
    ("d768 bert head", 768, 30522),
]
FP32_KERNELS = ("fp32_torch_mkl", "fp32_ort_mlas")
INT8_KERNELS = ("int8_ort_mlas", "int8_onednn", "int8_ort_mlas_u8u8")


def bench(label: str, tokens: int, k: int, n: int, threads: int, repeats: int,
          fbgemm: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(k, n, generator=g) / k**0.5
    qx = torch.randint(0, 256, (tokens, k), generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)  # oneDNN wants (out, in)
    packed = torch.ops.onednn.qlinear_prepack(qw, [tokens, k])
    w_scale, w_zero = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_session = ort_single_op(Path(tmp), "fp32", "MatMul", TensorProto.FLOAT, w.numpy(), threads)
        int8_session = ort_single_op(Path(tmp), "int8", "MatMulInteger", TensorProto.UINT8,
                                      qw.T.contiguous().numpy(), threads)
        u8u8_session = ort_single_op(Path(tmp), "u8u8", "MatMulInteger", TensorProto.UINT8,
                                     (qw.T.to(torch.int16) + 128).to(torch.uint8).contiguous().numpy(), threads)
        x_np, qx_np = x.numpy(), qx.numpy()
        kernels = {
            "fp32_torch_mkl": lambda _: torch.mm(x, w),
            "fp32_ort_mlas": lambda _: fp32_session.run(None, {"x": x_np}),
            "int8_ort_mlas": lambda _: int8_session.run(None, {"x": qx_np}),
            "int8_onednn": lambda _: torch.ops.onednn.qlinear_pointwise(
                qx, 0.02, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], ""),
            "int8_ort_mlas_u8u8": lambda _: u8u8_session.run(None, {"x": qx_np}),
        }
        if fbgemm:
            previous = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"
            fb_weight = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(
                qw.float() * 0.01, 0.01, 0, torch.qint8), None)
            fb_x = torch.quantize_per_tensor(qx.float() * 0.02 - 128 * 0.02, 0.02, 128, torch.quint8)
            kernels["int8_fbgemm"] = lambda _: torch.ops.quantized.linear(fb_x, fb_weight, 1.0, 0)
        torch.set_num_threads(threads)
        # one thread: this process's CPU time, which other processes on a shared CPU do not stretch
        latency = median_latencies_ms(kernels, {"x": x}, repeats=repeats,
                                      clock=time.process_time if threads == 1 else time.perf_counter)
        if fbgemm:
            torch.backends.quantized.engine = previous
    fp32 = min(FP32_KERNELS, key=latency.get)
    int8 = min([name for name in latency if name.startswith("int8") and not name.endswith("u8u8")], key=latency.get)
    macs = tokens * k * n
    return {"shape": label, "tokens": tokens, "in": k, "out": n, "threads": threads, "repeats": repeats,
            "clock": "cpu" if threads == 1 else "wall",
            "latency_ms": latency, "gmac_per_s": {name: macs / ms / 1e6 for name, ms in latency.items()},
            "fastest_fp32": fp32, "fastest_int8": int8, "limit": latency[fp32] / latency[int8],
            "limit_u8u8": latency[fp32] / latency["int8_ort_mlas_u8u8"],
            "ort_int8_vs_ort_fp32": latency["fp32_ort_mlas"] / latency["int8_ort_mlas"],
            "onednn_int8_vs_ort_int8": latency["int8_onednn"] / latency["int8_ort_mlas"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 128])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--fbgemm", action="store_true", help="also time FBGEMM's quantized::linear")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gemm_limit.json")
    args = parser.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    run = BenchmarkRun("gemm_limit", {"tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
                                      "fbgemm": args.fbgemm, "torch_capability": capability})
    print(f"CPU flags {run.machine['cpu_flags']}, torch {capability}", flush=True)
    rows = []
    for threads in args.threads:
        for tokens in args.tokens:
            for label, k, n in SHAPES:
                row = bench(label, tokens, k, n, threads, args.repeats, args.fbgemm)
                rows.append(row)
                run.write(args.out, rows)
                rate = "  ".join(f"{name} {value:6.1f}" for name, value in row["gmac_per_s"].items())
                print(f"{threads}t {tokens:5d} x {label:15s} GMAC/s: {rate}  | limit {row['limit']:.2f}x "
                      f"(u8 x u8 {row['limit_u8u8']:.2f}x)", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
