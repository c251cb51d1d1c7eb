"""Where quantizers go: one rule set over the stock Hugging Face modules of every family (no forward copies).

``quantize_(model, config)`` transforms a BERT/OPT/ViT/Llama model in place:

* weights of every ``nn.Linear``, ``nn.Embedding``, ``nn.Conv2d`` and LayerNorm/RMSNorm gamma (never biases) get a
  symmetric fake quantizer as a ``torch.nn.utils.parametrize`` parametrization;
* activation quantizers (asymmetric) sit in forward hooks, by *kind*:
  ``linear`` (every Linear output; the ViT patch ``conv`` output), ``activation`` (output of the FFN activation
  module), ``gated_product`` (input of ``down_proj`` in gated MLPs, i.e. ``act(gate) * up``), ``norm`` (every
  LayerNorm/RMSNorm output), ``residual`` (post-LN: every norm input; pre-LN: every block output and every norm
  input inside a block but its first, whose input is the previous block's quantized output), ``embedding_sum``
  (token + position embeddings entering the first block of OPT and ViT; BERT's is its embedding LayerNorm input),
  and the attention taps ``scores``, ``probs`` and ``context`` (after the gate).

The head (top-level modules outside the base model: BERT ``cls``, ``lm_head``, ``classifier``) stays in floating
point unless ``quantize_head``; gate networks have no Linear modules and so stay in floating point as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import activations as hf_activations

from quantizable.attention.interface import ATTN_IMPLEMENTATION, TAP_NAMES, register_attention_implementation
from quantizable.models import attention_modules, family_of_config
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.estimators import parse_estimator
from quantizable.quantization.quantizers import FakeQuantizer

# Families that add position embeddings to the token embeddings right before the first block (no norm in between).
ADDS_POSITIONS_BEFORE_FIRST_BLOCK = frozenset({"opt", "vit"})
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


@dataclass
class QuantizedModelHandle:
    """The quantizers installed on a model and the hooks to take them off again."""

    model: nn.Module
    config: QuantConfig
    weight_quantizers: dict[str, FakeQuantizer] = field(default_factory=dict)
    act_quantizers: dict[str, FakeQuantizer] = field(default_factory=dict)
    site_kinds: dict[str, str] = field(default_factory=dict)
    _hooks: list[Any] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def quantizers(self) -> Iterator[FakeQuantizer]:
        yield from self.weight_quantizers.values()
        yield from self.act_quantizers.values()

    def set_state(self, weights: str | None = None, acts: str | None = None) -> None:
        """Switch weight and/or activation quantizers to ``estimate``, ``frozen`` or ``off``."""
        for state, group in ((weights, self.weight_quantizers), (acts, self.act_quantizers)):
            if state is not None:
                for quantizer in group.values():
                    quantizer.set_state(state)

    def remove(self) -> None:
        """Restore the floating-point model: drop hooks, taps and parametrizations."""
        for hook in self._hooks:
            hook.remove()
        for undo in reversed(self._undo):
            undo()
        self._hooks.clear()
        self._undo.clear()
        if getattr(self.model, "_quantization_handle", None) is self:
            del self.model._quantization_handle


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATION_MODULES) or type(module).__module__ == hf_activations.__name__


def _quantize_output(quantizer: FakeQuantizer) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (quantizer(output[0]), *output[1:])
        return quantizer(output)

    return hook


def _quantize_input(quantizer: FakeQuantizer) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (quantizer(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": quantizer(kwargs["hidden_states"])}

    return hook


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: block}`` for the transformer blocks (children of the ModuleList holding attention)."""
    attention = set(map(id, attention_modules(model)))
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            any(id(m) in attention for m in child.modules()) for child in module
        ):
            return {f"{name}.{index}": child for index, child in enumerate(module)}
    raise ValueError(f"{type(model).__name__}: no ModuleList of transformer blocks found")


def _use_quantizable_attention(model: nn.Module, handle: QuantizedModelHandle) -> None:
    """Stock HF models: switch to the ``quantizable`` attention function so that the taps run."""
    register_attention_implementation()
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        return
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    handle._undo.append(lambda: model.set_attn_implementation(previous))


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> QuantizedModelHandle:
    """Install fake quantizers on ``model`` in place (all ``off`` until :func:`calibrate`); returns the handle."""
    config = config or QuantConfig()
    if getattr(model, "_quantization_handle", None) is not None:
        raise ValueError("model is already quantized; call handle.remove() first")
    family = family_of_config(model.config)
    device = next(model.parameters()).device
    handle = QuantizedModelHandle(model, config)
    weight_estimator, act_estimator = parse_estimator(config.weight_estimator), parse_estimator(config.act_estimator)
    head = {name for name, _ in model.named_children() if name != model.base_model_prefix}

    def in_scope(name: str) -> bool:
        return config.quantize_head or name.split(".", 1)[0] not in head

    def add_act(name: str, kind: str) -> FakeQuantizer:
        quantizer = FakeQuantizer(config.act_bits, False, act_estimator).to(device)
        handle.act_quantizers[f"{name}:{kind}"] = quantizer
        handle.site_kinds[f"{name}:{kind}"] = kind
        return quantizer

    def on_output(name: str, module: nn.Module, kind: str) -> None:
        handle._hooks.append(module.register_forward_hook(_quantize_output(add_act(name, kind))))

    def on_input(name: str, module: nn.Module, kind: str) -> None:
        hook = _quantize_input(add_act(name, kind))
        handle._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    modules = [(name, module) for name, module in model.named_modules() if name and in_scope(name)]
    if config.quantize_weights:
        for name, module in modules:
            has_weight = isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d))
            if has_weight or (is_norm(module) and getattr(module, "weight", None) is not None):
                _quantize_weight(handle, name, module, weight_estimator, device)
    if not config.quantize_acts:
        model._quantization_handle = handle
        return handle

    _use_quantizable_attention(model, handle)
    pre_ln = family.name != "bert" and bool(getattr(model.config, "do_layer_norm_before", True))
    blocks = _blocks(model)
    attention = set(attention_modules(model))
    first_norm_in_block = {
        next((m for m in block.modules() if is_norm(m)), None) for block in blocks.values()
    }
    if family.name in ADDS_POSITIONS_BEFORE_FIRST_BLOCK:
        first_name, first_block = next(iter(blocks.items()))
        on_input(first_name, first_block, "embedding_sum")
    for name, module in modules:
        if isinstance(module, nn.Linear):
            on_output(name, module, "linear")
        elif isinstance(module, nn.Conv2d):
            on_output(name, module, "conv")
        elif is_activation(module):
            on_output(name, module, "activation")
        elif is_norm(module):
            inside_block = any(name.startswith(f"{b}.") for b in blocks)
            if not pre_ln:
                on_input(name, module, "residual" if inside_block else "embedding_sum")
            elif inside_block and module not in first_norm_in_block:
                on_input(name, module, "residual")
            on_output(name, module, "norm")
        elif name in blocks and pre_ln:
            on_output(name, module, "residual")
        if all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            on_input(f"{name}.down_proj", module.down_proj, "gated_product")
        if module in attention:
            _install_taps(handle, name, module, add_act)
    model._quantization_handle = handle
    return handle


def _install_taps(handle: QuantizedModelHandle, name: str, module: nn.Module, add_act: Callable) -> None:
    previous = getattr(module, "attention_taps", None)
    module.attention_taps = {**(previous or {}), **{tap: add_act(name, tap) for tap in TAP_NAMES}}

    def undo() -> None:
        module.attention_taps = previous

    handle._undo.append(undo)


def _quantize_weight(
    handle: QuantizedModelHandle, name: str, module: nn.Module, estimator: Any, device: torch.device
) -> None:
    config = handle.config
    channel_axis = 0 if config.per_channel_weights and module.weight.dim() > 1 else None
    quantizer = FakeQuantizer(config.weight_bits, True, estimator, channel_axis, cache_frozen=True).to(device)
    parametrize.register_parametrization(module, "weight", quantizer)
    handle.weight_quantizers[f"{name}.weight"] = quantizer
    handle._undo.append(lambda: parametrize.remove_parametrizations(module, "weight", leave_parametrized=False))


def handle_of(model: nn.Module) -> QuantizedModelHandle:
    handle = getattr(model, "_quantization_handle", None)
    if handle is None:
        raise ValueError("model has no quantizers; call quantize_(model, config) first")
    return handle


def site_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer: name, kind (``weight`` or an activation kind), bits, state and range."""
    handle = handle_of(model)
    rows = []
    for group, kinds in ((handle.weight_quantizers, None), (handle.act_quantizers, handle.site_kinds)):
        for name, quantizer in group.items():
            calibrated = quantizer.calibrated
            rows.append({
                "name": name,
                "kind": "weight" if kinds is None else kinds[name],
                "bits": quantizer.bits,
                "state": quantizer.state,
                "min": float(quantizer.x_min.min()) if calibrated else None,
                "max": float(quantizer.x_max.max()) if calibrated else None,
            })
    return rows
