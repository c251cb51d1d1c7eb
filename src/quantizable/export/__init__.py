"""Real INT8 inference: static per-tensor INT8 with ONNX Runtime or PyTorch PT2E, FP32 vs INT8 quality and speed."""

from quantizable.export.common import LogitsModel, cpu_flags, median_latencies_ms
from quantizable.export.int8 import BACKENDS, export_int8
from quantizable.export.onnx import export_onnx, ort_int8, ort_logits, quantize_onnx, session

__all__ = ["BACKENDS", "LogitsModel", "cpu_flags", "export_int8", "export_onnx", "median_latencies_ms", "ort_int8",
           "ort_logits", "quantize_onnx", "session"]
