"""Real INT8 inference with PyTorch 2 export quantization (torchao PT2E) and Inductor's x86 INT8 kernels.

``torch.export`` traces the model (reference attention, ``fused_attention(False)``: the fast paths would trace as
our custom ops, inside which the quantizer could not place its observers, so clipped softmax and the gates are plain
aten ops here); ``prepare_pt2e`` with torchao's ``X86InductorQuantizer`` inserts observers, our calibration
batches run through it, ``convert_pt2e`` folds them into quantize/dequantize pairs, and ``torch.compile`` with
freezing lowers ``dequantize -> linear/conv -> quantize`` to oneDNN INT8 kernels (VNNI).

Placement is the X86 recipe: the inputs and weights of every Linear and Conv (so the head and the ViT patch
embedding too), both inputs of the two attention ``matmul``s (q, k^T, probabilities, v) and same-shape elementwise
products. Attention is traced on its materialised path for every method (not fused SDPA for vanilla and gated), as
in the ONNX export and the simulator, so every method is quantized at the same places.
Activations: unsigned 8-bit, asymmetric, per tensor, global min/max over the calibration batches (as ORT's MinMax).
Weights: signed 8-bit, symmetric, **per tensor**, written as per-channel parameters that all share one scale,
because Inductor's INT8 linear fusion only matches per-channel weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    QUANT_ANNOTATION_KEY,
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from quantizable.attention.interface import fused_attention
from quantizable.export.common import Batch, LogitsFn, LogitsOnly, input_names
from quantizable.models.modeling import attention_modules

EPS = 2**-12  # torchao's x86 default: the smallest scale an observer may return


class SharedScaleWeightObserver(PerChannelMinMaxObserver):
    """Per-tensor symmetric weights in per-channel form: every output channel gets the scale of the whole tensor,
    so the numbers are the simulator's per-tensor weights while Inductor still fuses the per-channel pattern."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.min_val.min().expand_as(self.min_val), self.max_val.max().expand_as(self.max_val)
        return self._calculate_qparams(low, high)


class FloatOnlyX86InductorQuantizer(X86InductorQuantizer):
    """``X86InductorQuantizer`` that leaves integer and boolean tensors alone. The stock recipe annotates every
    same-shape ``aten.mul.Tensor``, including OPT's position ids (``cumsum(mask) * mask``, int64), whose observer
    then fails (``"histogram_cpu" not implemented for 'Long'``)."""

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get(QUANT_ANNOTATION_KEY)
            if annotation is None:
                continue
            touched = [*annotation.input_qspec_map, *([node] if annotation.output_qspec is not None else [])]
            if not all(_is_float(value) for value in touched):
                del node.meta[QUANT_ANNOTATION_KEY]
        return model


def _is_float(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def quantization_config() -> QuantizationConfig:
    """torchao's x86 static config with MinMax activation ranges and per-tensor (shared-scale) weights."""
    base = get_default_x86_inductor_quantization_config()
    activation = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=EPS))
    weight = dataclasses.replace(base.weight, observer_or_fake_quant_ctr=SharedScaleWeightObserver.with_args(eps=EPS))
    return QuantizationConfig(activation, activation, weight, base.bias, is_qat=False)


@contextmanager
def materialised_attention(model: nn.Module) -> Iterator[None]:
    """Every attention module computes explicit scores and probabilities (an identity ``probs`` tap selects that
    path in ``quantizable_attention_forward``) instead of fused SDPA, so their matmuls can be quantized."""
    modules = attention_modules(model)
    previous = [getattr(module, "attention_taps", None) for module in modules]
    for module, taps in zip(modules, previous):
        module.attention_taps = {"probs": _identity, **(taps or {})}
    try:
        yield
    finally:
        for module, taps in zip(modules, previous):
            module.attention_taps = taps


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def export_program(model: nn.Module, example: Batch) -> ExportedProgram:
    """``torch.export`` of ``model``'s logits (eval mode, reference ops, materialised attention) with a dynamic
    batch axis."""
    names = input_names(example)
    batch = Dim("batch")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fused_attention(False), materialised_attention(model):
            return torch.export.export(LogitsOnly(model, names), tuple(example[name] for name in names),
                                       dynamic_shapes=(tuple({0: batch} for _ in names),))
    finally:
        model.train(was_training)


def quantize_program(program: ExportedProgram, calibration: Iterable[Batch]) -> torch.fx.GraphModule:
    """Static INT8 of an exported program: prepare with the x86 recipe (``quantization_config`` for Linear/Conv,
    the attention matmuls and products), run the calibration batches, convert to quantize/dequantize pairs."""
    config = quantization_config()
    quantizer = FloatOnlyX86InductorQuantizer().set_global(config).set_function_type_qconfig(torch.matmul, config)
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*(batch[name] for name in input_names(batch)))
    return _drop_unused_parameters(convert_pt2e(prepared))


def _drop_unused_parameters(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``convert_pt2e`` leaves each FP32 weight registered beside its folded INT8 copy; without this the saved INT8
    program would hold both."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(module.get_submodule(owner), leaf)
    return module


class Compiled(nn.Module):
    """``torch.compile`` with freezing: weights become constants, which Inductor's INT8 weight prepacking needs
    (FP32 gets the same, so both are timed with their best CPU lowering). Freezing is patched in around every call,
    not passed as a compile option: with ``options={"freezing": True}`` the prepacking fails
    (``UnsupportedOperatorException: onednn.qlinear_prepack``), and a later recompilation (new batch size) must
    freeze as well."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*inputs)


def logits_function(module: nn.Module) -> LogitsFn:
    """An exported / converted / compiled module (positional inputs) as a logits function."""

    def logits(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return module(*(batch[name] for name in input_names(batch)))

    return logits


def pt2e_int8(model: nn.Module, calibration: list[Batch], example: Batch, out: Path,
              compile: bool = True) -> tuple[dict[str, LogitsFn], dict[str, str]]:
    """FP32 and INT8 logits functions of ``model`` (both compiled unless ``compile`` is False: then the converted
    reference graph, dequantize -> FP32 op, which is slow but numerically the INT8 model) and the files written:
    ``model.fp32.pt2`` and ``model.int8.pt2`` (``torch.export.load(...).module()``, then ``Compiled``)."""
    program = export_program(model, example)
    int8 = quantize_program(program, calibration)
    names = input_names(example)
    args = tuple(example[name] for name in names)
    # the converted graph module takes the inputs as separate arguments, the wrapper as one varargs tuple
    int8_program = torch.export.export(int8, args, dynamic_shapes=tuple({0: Dim("batch")} for _ in names))
    files = {"fp32": out / "model.fp32.pt2", "int8": out / "model.int8.pt2"}
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, files["fp32"])
    torch.export.save(int8_program, files["int8"])
    modules = {"fp32": program.module(), "int8": int8}
    if compile:
        modules = {name: Compiled(module) for name, module in modules.items()}
    return {name: logits_function(module) for name, module in modules.items()}, {k: v.name for k, v in files.items()}
