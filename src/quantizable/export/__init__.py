"""Real INT8 inference: export to ONNX, static per-tensor INT8 with ONNX Runtime, FP32 vs INT8 quality and speed."""

from quantizable.export.int8 import BACKENDS, export_int8
from quantizable.export.onnx import OrtModel, export_onnx, median_latencies_ms, quantize_onnx, session

__all__ = ["BACKENDS", "OrtModel", "export_int8", "export_onnx", "median_latencies_ms", "quantize_onnx", "session"]
