"""The whole INT8 pipeline on one model: export, calibrate, quantize, then FP32 vs INT8 quality and latency.

Backends (``onnxruntime``: ``export.onnx``; ``pt2e``: ``export.pt2e``) only turn the model into FP32 and INT8
logits functions; calibration data, evaluation and timing are the same code for both.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from quantizable.evaluation import evaluate
from quantizable.export.common import Batch, LogitsModel, cpu_flags, median_latencies_ms, torch_threads

BACKENDS = ("onnxruntime", "pt2e")


@contextmanager
def _quiet() -> Iterator[None]:
    """The tracers warn about every Python-level shape check and ORT's quantizer (through the root logger) about
    every LayerNorm bias and constant (zero-range) tensor; none is actionable, so keep the CLI output readable."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(previous)


def export_int8(
    model: nn.Module,
    calibration: Iterable[Batch],
    evaluation: Callable[[], Iterable[Batch]],
    out: str | Path,
    backend: str = "onnxruntime",
    threads: int = 1,
    repeats: int = 20,
    simulate: bool = True,
    compile: bool = True,
) -> dict[str, Any]:
    """Static per-tensor INT8 of ``model`` calibrated on ``calibration``; scores FP32 and INT8 on ``evaluation()``
    (a fresh iterable per call) with ``quantizable.evaluation``'s metric, and times both on its first batch with
    ``threads`` threads. FP32 is the same backend's FP32 path (ORT session; PT2E: the exported program, compiled
    like INT8 unless ``compile`` is False, which runs the converted reference graph: for tests, not for timing).

    Returns (and the CLI writes) ``{"backend", "metric", "fp32": {"metric", "latency_ms"}, "int8": {...},
    "speedup", "threads", "cpu_flags", "compiled", "latency_batch", "files", "onnx_weight_type"?, "simulated_w8a8"?}``
    (``onnx_weight_type``: ``weight_type()``, which depends on the CPU). With ``simulate``, the simulator's W8A8
    number (head quantized too, like both backends) on the same calibration batches is added.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    calibration = list(calibration)
    if not calibration:
        raise ValueError("no calibration batches")
    example = next(iter(evaluation()), None)
    if example is None:
        raise ValueError("no evaluation batches")
    out = Path(out)
    with _quiet(), torch_threads(threads):
        if backend == "onnxruntime":
            from quantizable.export.onnx import ort_int8

            from quantizable.export.onnx import weight_type

            functions, files = ort_int8(model, calibration, example, out, threads)
            details = {"onnx_weight_type": weight_type().name}
        else:
            from quantizable.export.pt2e import pt2e_int8

            functions, files = pt2e_int8(model, calibration, example, out, compile=compile)
            details = {}
        latency = median_latencies_ms(functions, example, repeats=repeats)
        scores = {name: evaluate(LogitsModel(function, model.config), evaluation())
                  for name, function in functions.items()}
    result: dict[str, Any] = {
        "backend": backend,
        "metric": scores["fp32"]["metric"],
        **{name: {"metric": scores[name]["value"], "latency_ms": latency[name]} for name in functions},
        "speedup": latency["fp32"] / latency["int8"],
        "threads": threads,
        "cpu_flags": cpu_flags(),
        "compiled": backend == "pt2e" and compile,
        "latency_batch": {name: list(value.shape) for name, value in example.items() if name != "labels"},
        "eval_count": scores["fp32"]["count"],
        "files": files,
        **details,
    }
    if simulate:
        from quantizable.quantization import QuantConfig, simulate_w8a8

        simulated = simulate_w8a8(model, calibration, evaluation, QuantConfig(quantize_head=True))
        result["simulated_w8a8"] = {"torch_fp": simulated["fp"], "metric": simulated["quantized"]["mean"]}
    return result
