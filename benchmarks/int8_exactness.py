"""Are this CPU's INT8 GEMM kernels exact? Each kernel's int32 result against numpy's int64 product, for the operand
types our backends use. Without VNNI, x86 u8 x s8 kernels add pairs of products in a saturating int16
(``vpmaddubsw``: 255 x 127 x 2 > 32767); ``quantizable.export.onnx.weight_type`` avoids that for ONNX Runtime.

    python benchmarks/int8_exactness.py [--out benchmarks/results/int8_exactness.json]

Inputs: "adversarial" (every other activation at 255, weights +-127: the worst case) and "gaussian" (uniform u8
activations, Gaussian weights scaled to +-127: what a calibrated layer looks like). Reports the largest absolute error
and the share of wrong outputs per kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from quantizable.benchmarking import BenchmarkRun

M, K, N = 64, 768, 256


def _operands(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """u8 activations (M, K) and s8 weights (K, N)."""
    if kind == "adversarial":
        x = rng.integers(0, 256, (M, K), dtype=np.uint8)
        x[:, ::2] = 255
        return x, (rng.choice([-127, 127], size=(K, N))).astype(np.int8)
    gaussian = rng.standard_normal((K, N))
    return (rng.integers(0, 256, (M, K), dtype=np.uint8),
            np.round(gaussian / np.abs(gaussian).max() * 127).astype(np.int8))


def _ort(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ORT ``MatMulInteger`` (what a QDQ MatMul runs): int32 = (x - 0) @ (w - zero point)."""
    x_type = TensorProto.UINT8 if x.dtype == np.uint8 else TensorProto.INT8
    inputs, initializers = ["x", "w"], [numpy_helper.from_array(w, "w")]
    if w.dtype == np.uint8:  # unsigned weights with the zero point at 128, as weight_type() chooses without VNNI
        inputs += ["", "w_zero"]
        initializers.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), "w_zero"))
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", x_type, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [M, N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _onednn(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """oneDNN ``qlinear_pointwise`` (what PT2E's Inductor fusion runs), unit scales, float output."""
    weight = torch.from_numpy(np.ascontiguousarray(w.T))
    packed = torch.ops.onednn.qlinear_prepack(weight, [M, K])
    out = torch.ops.onednn.qlinear_pointwise(torch.from_numpy(x), 1.0, 0, packed, torch.ones(N),
                                             torch.zeros(N, dtype=torch.long), None, 1.0, 0, torch.float32,
                                             "none", [], "")
    return out.numpy()


def check(kind: str) -> dict[str, Any]:
    x, w = _operands(kind, np.random.default_rng(0))
    exact = x.astype(np.int64) @ w.astype(np.int64)
    results = {
        "ort u8 x s8": _ort(x, w),
        "ort u8 x u8 (zero point 128)": _ort(x, (w.astype(np.int16) + 128).astype(np.uint8)),
        "ort s8 x s8": _ort((x.astype(np.int16) - 128).astype(np.int8), w),
        "onednn u8 x s8": _onednn(x, w),
    }
    # the s8 x s8 case multiplies x - 128: its exact product differs by 128 * column sums
    shifted = (x.astype(np.int64) - 128) @ w.astype(np.int64)
    rows = {}
    for name, value in results.items():
        reference = shifted if name == "ort s8 x s8" else exact
        error = np.abs(value.astype(np.float64) - reference)
        rows[name] = {"max_abs_error": float(error.max()), "wrong_share": float((error > 0.5).mean()),
                      "largest_sum": float(np.abs(reference).max())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_exactness.json")
    args = parser.parse_args()
    run = BenchmarkRun("int8_exactness", {"shape": [M, K, N]})
    inputs = {kind: check(kind) for kind in ("adversarial", "gaussian")}
    run.write(args.out, [{"inputs": kind, "kernels": rows} for kind, rows in inputs.items()])
    print(f"CPU flags: {run.machine['cpu_flags']}")
    for kind, rows in inputs.items():
        for name, row in rows.items():
            print(f"{kind:12s} {name:30s} max |error| {row['max_abs_error']:>10.0f}  wrong {row['wrong_share']:.2%}"
                  f"  (largest sum {row['largest_sum']:.0f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
