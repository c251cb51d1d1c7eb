"""Real INT8 inference with ONNX Runtime: FP32 ONNX export, static per-tensor QDQ quantization, an evaluation adapter.

The exported graph is the plain-torch reference attention (``fused_attention(False)``), so clipped softmax, softmax+1
and the gates are ordinary ONNX ops (the fast paths' custom ops have no ONNX form, and INT8 needs the ops inside).
Quantization is ORT's ``quantize_static``: QDQ format, per-tensor MinMax ranges, unsigned 8-bit activations and
symmetric 8-bit weights (signed, or unsigned with zero point 128 where the CPU's u8 x s8 GEMM saturates:
``weight_type``), calibrated on the batches given (the simulator's calibration data); the logits stay float.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator
from torch import nn

from quantizable.attention.interface import fused_attention
from quantizable.export.common import LogitsFn, LogitsOnly, has_int8_dot_product, input_names

OPSET = 17
# Calibrated ranges beyond this are mask fill values (finfo.min), not activations; real outliers are ~1e3.
MASK_LIMIT = 1e9
GEMMS = ("MatMul", "Gemm")
# One ONNX file holds at most 2 GiB; larger graphs keep their weights in an external data file.
PROTOBUF_LIMIT = 2**31 - 2**20


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Export ``model`` (eval mode, reference attention) to an FP32 ONNX graph with dynamic batch and length axes."""
    names = input_names(example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: ({0: "batch", 1: "sequence"} if example[name].dim() == 2 else {0: "batch"}) for name in names}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fused_attention(False):
            torch.onnx.export(LogitsOnly(model, names), tuple(example[name] for name in names), str(path),
                              input_names=names, output_names=["logits"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={**dynamic, "logits": {0: "batch"}})
    finally:
        model.train(was_training)
    graph = onnx.load(str(path))
    if inline_aliased_initializers(graph.graph):
        large = sum(len(tensor.raw_data) for tensor in graph.graph.initializer) >= PROTOBUF_LIMIT
        onnx.save(graph, str(path), save_as_external_data=large)
    return path


def inline_aliased_initializers(graph: onnx.GraphProto) -> int:
    """Replace every ``Identity`` of an initializer by a copy of the initializer under the Identity's output name;
    returns how many. The TorchScript exporter deduplicates parameters with equal values (every zero bias and
    unit LayerNorm weight of a fresh model, OPT's tied-looking FFN biases) into ``Identity`` nodes, and ORT's
    quantizer then sees a Gemm/Add whose bias is not a constant: it warns ("exclude this node for better
    performance") and leaves the bias in FP32 outside the INT8 kernel."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = [node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return len(aliases)


class CalibrationReader(CalibrationDataReader):
    """ORT's calibration input: our batches as numpy feeds, labels dropped."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (feeds(batch) for batch in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def feeds(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """ORT inputs of a batch."""
    return {name: batch[name].numpy() for name in input_names(batch)}


def masked_nodes(fp32_path: str | Path, calibration: list[dict[str, torch.Tensor]],
                 limit: float = MASK_LIMIT) -> list[str]:
    """Nodes that read or write a tensor whose calibrated range exceeds ``limit``: the attention-mask path, where
    masked scores hold ``finfo.min``. Quantizing them gives an infinite scale and destroys attention, so they stay
    in floating point (the simulator quantizes the scores before the mask instead)."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(Path(fp32_path), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(CalibrationReader(calibration))
        ranges = calibrator.compute_data()
    unbounded = {name for name in ranges.data if not _within(ranges[name].range_value, limit)}
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    return [node.name for node in graph.node if unbounded & {*node.input, *node.output}]


def _within(bounds: tuple[np.ndarray, np.ndarray], limit: float) -> bool:
    values = np.asarray(bounds, dtype=np.float64)
    return bool(np.all(np.isfinite(values)) and np.abs(values).max() <= limit)


def weight_type() -> QuantType:
    """The 8-bit weight type whose GEMMs are exact on this CPU. ONNX Runtime's u8 x s8 kernel on x86 without VNNI
    sums pairs of products in int16 (``vpmaddubsw``), which saturates (255 x 127 x 2 > 32767): on this project's
    AVX2-only EPYC, 0.03-0.4% of a GEMM's outputs came out wrong for Gaussian weights (by up to 13,597 on int32
    sums; ``tests/test_export.py`` checks against numpy's integer product). There u8 x u8 is exact and 7-17% slower
    end to end (benchmarks/bench_int8_weight_types.py; s8 x s8 is exact too but runs a 7x slower kernel), so
    weights are unsigned with the zero point fixed at 128: a symmetric grid (scale max|w| / 127.5). With VNNI / AMX,
    u8 x s8 accumulates in int32 and stays. A file quantized on a VNNI machine saturates on one without: quantize
    where it will run."""
    return QuantType.QInt8 if has_int8_dot_product() else QuantType.QUInt8


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[dict[str, torch.Tensor]],
                  float_logits: bool = True, weights: QuantType | None = None) -> Path:
    """Static INT8 (QDQ, per-tensor MinMax, QUInt8 activations, symmetric 8-bit weights of ``weights``, by default
    ``weight_type()``) calibrated on the batches, with the attention-mask path (``masked_nodes``) left in floating
    point. With ``float_logits`` the head's GEMM keeps INT8 inputs and weights but writes float logits
    (``unquantize_outputs``)."""
    calibration = list(calibration)
    excluded = masked_nodes(fp32_path, calibration)
    quantize_static(str(fp32_path), str(int8_path), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=weights or weight_type(), per_channel=False,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                    extra_options={"WeightSymmetric": True})
    if float_logits:
        int8 = onnx.load(str(int8_path))
        unquantize_outputs(int8.graph)
        if not any(opset.domain == "com.microsoft" for opset in int8.opset_import):
            int8.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        onnx.save(int8, str(int8_path))
    return Path(int8_path)


def unquantize_outputs(graph: onnx.GraphProto) -> int:
    """Remove the quantize/dequantize pairs between the last GEMM and each graph output (and, for a head that adds
    its bias separately, BERT's, between the GEMM and that ``Add``); returns how many. ORT then runs the head as one
    ``MatMulIntegerToFloat`` (INT8 inputs, float output) instead of ``QLinearMatMul`` + requantize + dequantize of
    batch x length x vocabulary values, and the logits keep float resolution instead of 256 levels. Measured
    (bench_int8_variants geometry, d=256, 4 layers, batch 8 x 128, one run): OPT 350 -> 319 ms, Llama 270 -> 219 ms,
    BERT 219 -> 218 ms, logits' error against FP32 slightly lower in all three."""
    removed = 0
    for output in graph.output:
        producer = _drop_qdq(graph, output.name)
        if producer is None:
            continue
        removed += 1
        if producer.op_type == "Add":
            for tensor in list(producer.input):
                removed += _drop_qdq(graph, tensor, sources=GEMMS) is not None
            _fold_head_bias(graph, producer)
    return removed


def _constant_dequantized(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
                          constants: dict[str, onnx.TensorProto], name: str) -> bool:
    """Whether ``name`` is an initializer or a DequantizeLinear of initializers."""
    node = producers.get(name)
    return name in constants or (node is not None and node.op_type == "DequantizeLinear"
                                 and all(value in constants for value in node.input))


def _fold_head_bias(graph: onnx.GraphProto, add: onnx.NodeProto) -> bool:
    """``Add(MatMul(DequantizeLinear(a), DequantizeLinear(W)), bias)`` with a constant bias and per-tensor
    quantization -> one ``com.microsoft.MatMulIntegerToFloat(a, W, scales, zero points, bias)``, what ORT runs for the
    MatMul anyway, now adding the bias in the kernel instead of one more pass over batch x length x vocabulary floats
    (BERT's head; issue 34: ~15% of the head's time on the AVX2 EPYC). Same float operations, same logits."""
    producers = _producers(graph)
    constants = {init.name: init for init in graph.initializer}
    bias = next((name for name in add.input if _constant_dequantized(graph, producers, constants, name)), None)
    matmul = next((producers[name] for name in add.input if name != bias and name in producers), None)
    if matmul is None or bias is None or matmul.op_type != "MatMul" or len(_readers(graph, matmul.output[0])) != 1:
        return False
    dequantized = [producers.get(name) for name in matmul.input]
    if not all(node is not None and node.op_type == "DequantizeLinear" and len(node.input) == 3 for node in dequantized):
        return False
    if any(len(constants[node.input[1]].dims) if node.input[1] in constants else 1 for node in dequantized):
        return False  # per-channel (or non-constant) scales
    (a, a_scale, a_zero), (w, w_scale, w_zero) = (list(node.input) for node in dequantized)
    if bias not in constants:  # the quantizer's 8-bit bias: its float values, as DequantizeLinear computes them
        bias_dq = producers[bias]
        q, scale, zero = (numpy_helper.to_array(constants[name]) for name in bias_dq.input)
        values = ((q.astype(np.int32) - zero.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)
        bias = f"{bias}_folded"
        graph.initializer.append(numpy_helper.from_array(values, bias))
        if len(_readers(graph, bias_dq.output[0])) == 1:
            graph.node.remove(bias_dq)
    fused = onnx.helper.make_node("MatMulIntegerToFloat", [a, w, a_scale, w_scale, a_zero, w_zero, bias],
                                  list(add.output), name=f"{matmul.name}_bias", domain="com.microsoft")
    graph.node.insert(list(graph.node).index(add), fused)
    graph.node.remove(add)
    graph.node.remove(matmul)
    for node in dequantized:
        if node in graph.node and not _readers(graph, node.output[0]):
            graph.node.remove(node)
    return True


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _readers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if tensor in node.input]


def _drop_qdq(graph: onnx.GraphProto, tensor: str, sources: tuple[str, ...] | None = None) -> onnx.NodeProto | None:
    """If ``tensor`` is ``DequantizeLinear(QuantizeLinear(x))`` with both read only along that chain (and ``x``
    produced by one of the op types ``sources``, if given), make ``x``'s producer write ``tensor`` directly and
    delete the pair; returns that producer (None if nothing was done)."""
    producers = _producers(graph)
    dequantize = producers.get(tensor)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = producers.get(dequantize.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or len(_readers(graph, quantize.output[0])) != 1:
        return None
    source = producers.get(quantize.input[0])
    if source is None or len(_readers(graph, quantize.input[0])) != 1 or (sources and source.op_type not in sources):
        return None
    source.output[list(source.output).index(quantize.input[0])] = tensor
    graph.node.remove(quantize)
    graph.node.remove(dequantize)
    return source


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """An ORT CPU session with a fixed thread count, so FP32 and INT8 timings are comparable."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(ort_session: ort.InferenceSession) -> LogitsFn:
    """The session as a logits function (``quantizable.export.common``), for the shared evaluation and timing."""

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        (values,) = ort_session.run(["logits"], feeds(batch))
        return torch.from_numpy(values)

    return logits


def ort_int8(model: nn.Module, calibration: list[dict[str, torch.Tensor]], example: dict[str, torch.Tensor],
             out: Path, threads: int = 1) -> tuple[dict[str, LogitsFn], dict[str, str]]:
    """FP32 and INT8 ORT sessions of ``model`` as logits functions, and the files written (``model.fp32.onnx``,
    ``model.int8.onnx``)."""
    fp32_path = export_onnx(model, example, out / "model.fp32.onnx")
    int8_path = quantize_onnx(fp32_path, out / "model.int8.onnx", calibration)
    paths = {"fp32": fp32_path, "int8": int8_path}
    return {name: ort_logits(session(path, threads)) for name, path in paths.items()}, \
        {name: path.name for name, path in paths.items()}
