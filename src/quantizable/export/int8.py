"""The whole INT8 pipeline on one model: export, calibrate, quantize, then FP32 vs INT8 quality and latency."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantizable.evaluation import evaluate
from quantizable.export.onnx import OrtModel, export_onnx, median_latencies_ms, quantize_onnx, session

Batch = dict[str, torch.Tensor]
BACKENDS = ("onnxruntime",)


@contextmanager
def _quiet() -> Iterator[None]:
    """The tracer warns about every Python-level shape check and ORT's quantizer (through the root logger) about
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
) -> dict[str, Any]:
    """Static per-tensor INT8 of ``model`` calibrated on ``calibration``; scores FP32 and INT8 on ``evaluation()``
    (a fresh iterable per call) with ``quantizable.evaluation``'s metric, and times both on its first batch.

    Returns (and the CLI writes) ``{"backend", "metric", "fp32": {"metric", "latency_ms"}, "int8": {...},
    "speedup", "threads", "latency_batch", "files", "simulated_w8a8"?}``. With ``simulate``, the simulator's W8A8
    number (head quantized too, like ORT) on the same calibration batches is added for comparison.
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
    with _quiet():
        fp32_path = export_onnx(model, example, out / "model.fp32.onnx")
        int8_path = quantize_onnx(fp32_path, out / "model.int8.onnx", calibration)
    sessions = {"fp32": session(fp32_path, threads), "int8": session(int8_path, threads)}
    latency = median_latencies_ms(sessions, example, repeats=repeats)
    scores = {name: evaluate(OrtModel(s, model.config), evaluation()) for name, s in sessions.items()}
    result: dict[str, Any] = {
        "backend": backend,
        "metric": scores["fp32"]["metric"],
        **{name: {"metric": scores[name]["value"], "latency_ms": latency[name]} for name in sessions},
        "speedup": latency["fp32"] / latency["int8"],
        "threads": threads,
        "latency_batch": {name: list(value.shape) for name, value in example.items() if name != "labels"},
        "eval_count": scores["fp32"]["count"],
        "files": {"fp32": fp32_path.name, "int8": int8_path.name},
    }
    if simulate:
        from quantizable.quantization import QuantConfig, simulate_w8a8

        simulated = simulate_w8a8(model, calibration, evaluation, QuantConfig(quantize_head=True))
        result["simulated_w8a8"] = {"torch_fp": simulated["fp"], "metric": simulated["quantized"]["mean"]}
    return result
