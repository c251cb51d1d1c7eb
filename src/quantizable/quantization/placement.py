"""Where quantizers go: one rule set over the stock Hugging Face modules of every family (no forward copies).

``quantize_(model, config, filter_fn)`` transforms a model of any supported family in place. What differs between
families (block classes, pre-/post-LN, positions added before the first block, which layer types are linear and
their output-channel axis) comes from the family record (:class:`quantizable.models.Family`); the rules here
turn it into two lists, :func:`weight_sites` and :func:`activation_sites`, and one loop installs them:

* weights of every linear-like layer (``nn.Linear``, GPT-2's ``Conv1D``), ``nn.Embedding``, ``nn.Conv2d`` and
  LayerNorm/RMSNorm gamma (never biases) get a symmetric fake quantizer as a ``torch.nn.utils.parametrize``
  parametrization;
* activation quantizers (asymmetric) sit in forward hooks, by *kind*:
  ``linear`` (every linear-like output; the ViT patch ``conv`` output), ``activation`` (output of the FFN
  activation module), ``gated_product`` (input of ``down_proj`` in gated MLPs, i.e. ``act(gate) * up``), ``norm``
  (every LayerNorm/RMSNorm output), ``residual`` (post-LN: every norm input; pre-LN: every block output and every
  norm input inside a block but its first, whose input is the previous block's quantized output),
  ``embedding_sum`` (token + position embeddings entering the first block where the family adds positions there;
  post-LN: the input of every norm outside the blocks, e.g. BERT's embedding LayerNorm), and the attention taps
  ``scores``, ``probs`` and ``context`` (after the gate).

The head (top-level modules outside the base model: BERT ``cls``, ``lm_head``, ``classifier``) stays in floating
point unless ``quantize_head``; gate networks have no Linear modules and so stay in floating point as in the paper.
``filter_fn(module, qualified_name) -> bool`` (as in torchao's ``quantize_``) keeps only the sites it accepts.

``QuantConfig.setup`` selects rule variants (``quantization.setups``): the ``paper`` setup drops the ``linear``
site the FFN activation reads (Linear + activation fused), adds ``partial_embedding_sum`` (BERT word + token type),
quantizes the pre-LN mid-block residual in place (one quantized sum for the norm and the FFN's residual add),
taps OPT's context before the gate, and gives non-negative weights the unsigned grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import activations as hf_activations

from quantizable.attention.interface import ATTN_IMPLEMENTATION, TAP_NAMES, register_attention_implementation
from quantizable.models import attention_modules, family_of_config, is_norm
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.estimators import parse_estimator
from quantizable.quantization.quantizers import FakeQuantizer
from quantizable.quantization.setups import UnsignedWhenNonNegative, get_setup

ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class WeightSite:
    """A weight to fake-quantize; ``channel_axis`` is the output-channel axis (per-channel ranges run along it)."""

    name: str
    module: nn.Module
    channel_axis: int | None


@dataclass(frozen=True)
class ActivationSite:
    """An activation to fake-quantize: a module's input or output, or one of its attention taps."""

    name: str
    module: nn.Module
    kind: str
    where: Literal["input", "output", "tap", "sum_with_input_embeddings"]
    tap: str | None = None  # the attention tap (``where="tap"``)
    in_place: bool = False  # an input quantized in place, so that every reader of the tensor sees Q(x)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.kind}"


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

    def add_hook(self, hook: Any) -> None:
        """Own a hook registered on the model (a ``RemovableHandle``): :meth:`remove` takes it off with the rest."""
        self._hooks.append(hook)

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


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATION_MODULES) or type(module).__module__ == hf_activations.__name__


def _quantize_output(quantizer: FakeQuantizer) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (quantizer(output[0]), *output[1:])
        return quantizer(output)

    return hook


def _quantize_input(quantizer: FakeQuantizer, in_place: bool = False) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0] if args else kwargs["hidden_states"]
        if in_place:  # the caller's other references to x (e.g. a residual branch) see Q(x) too
            x.copy_(quantizer(x))
            return None
        if args:
            return (quantizer(x), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": quantizer(x)}

    return hook


def _quantize_sum_with_input_embeddings(handle: QuantizedModelHandle, model: nn.Module, module: nn.Module,
                                        quantizer: FakeQuantizer) -> None:
    """Quantize ``input_embeddings + module`` (BERT's word + token-type sum, which is no module's output): the
    module's output becomes ``Q(word + type) - word``, so the model's own sum equals ``Q(word + type)`` (up to
    one float rounding)."""
    latest: dict[str, torch.Tensor] = {}

    def keep(embeddings: nn.Module, args: tuple, output: torch.Tensor) -> None:
        latest["words"] = output

    def replace(embeddings: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        words = latest.pop("words", None)
        if words is None:
            raise ValueError("the partial embedding sum site needs input_ids (the word embeddings did not run)")
        return quantizer(words + output) - words

    handle.add_hook(model.get_input_embeddings().register_forward_hook(keep))
    handle.add_hook(module.register_forward_hook(replace))


def _use_quantizable_attention(model: nn.Module, handle: QuantizedModelHandle) -> None:
    """Stock HF models: switch to the ``quantizable`` attention function so that the taps run."""
    register_attention_implementation()
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        return
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    handle._undo.append(lambda: model.set_attn_implementation(previous))


def _in_scope(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """Named submodules outside the head (unless ``quantize_head``)."""
    head = {name for name, _ in model.named_children() if name != model.base_model_prefix}
    return [(name, module) for name, module in model.named_modules()
            if name and (config.quantize_head or name.split(".", 1)[0] not in head)]


def weight_sites(model: nn.Module, config: QuantConfig) -> list[WeightSite]:
    """Every weight ``quantize_`` fake-quantizes, in module order."""
    family = family_of_config(model.config)
    sites = []
    for name, module in _in_scope(model, config):
        axis = family.linear_weight_axis(module)
        if axis is None and isinstance(module, (nn.Embedding, nn.Conv2d)):
            axis = 0
        if axis is not None or (is_norm(module) and getattr(module, "weight", None) is not None):
            per_channel = config.per_channel_weights and axis is not None and module.weight.dim() > 1
            sites.append(WeightSite(name, module, axis if per_channel else None))
    return sites


def activation_sites(model: nn.Module, config: QuantConfig) -> list[ActivationSite]:
    """Every activation ``quantize_`` fake-quantizes, in module order (the rules of the module docstring, as the
    config's setup selects them)."""
    family = family_of_config(model.config)
    setup = get_setup(config.setup)
    pre_ln = family.is_pre_ln(model.config)
    blocks = dict(family.blocks(model))
    attention = set(attention_modules(model))
    first_norm_in_block = {next((m for m in block.modules() if is_norm(m)), None) for block in blocks.values()}
    fused = {f"{b}.{family.ffn_activation_input}" for b in blocks} if setup.fuse_linear_activation else set()
    partial_sum = family.token_type_embeddings if setup.partial_embedding_sum else None
    context_tap = "ungated_context" if family.name in setup.context_before_gate else "context"
    sites = []
    if family.positions_before_first_block:
        first_name, first_block = next(iter(blocks.items()))
        sites.append(ActivationSite(first_name, first_block, "embedding_sum", "input"))
    for name, module in _in_scope(model, config):
        if name == partial_sum:
            sites.append(ActivationSite(name, module, "partial_embedding_sum", "sum_with_input_embeddings"))
        if family.linear_weight_axis(module) is not None:
            if name not in fused:
                sites.append(ActivationSite(name, module, "linear", "output"))
        elif isinstance(module, nn.Conv2d):
            sites.append(ActivationSite(name, module, "conv", "output"))
        elif is_activation(module):
            sites.append(ActivationSite(name, module, "activation", "output"))
        elif is_norm(module):
            inside_block = any(name.startswith(f"{b}.") for b in blocks)
            if not pre_ln:
                sites.append(ActivationSite(name, module, "residual" if inside_block else "embedding_sum", "input"))
            elif inside_block and module not in first_norm_in_block:
                sites.append(ActivationSite(name, module, "residual", "input", in_place=setup.shared_residual))
            sites.append(ActivationSite(name, module, "norm", "output"))
        elif name in blocks and pre_ln:
            sites.append(ActivationSite(name, module, "residual", "output"))
        if all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            sites.append(ActivationSite(f"{name}.down_proj", module.down_proj, "gated_product", "input"))
        if module in attention:
            for tap in TAP_NAMES:
                gated_context = tap == "context" and getattr(module, "attn_gate", None) is not None
                sites.append(ActivationSite(name, module, tap, "tap", context_tap if gated_context else tap))
    return sites


def quantize_(model: nn.Module, config: QuantConfig | None = None,
              filter_fn: FilterFn | None = None) -> QuantizedModelHandle:
    """Install fake quantizers on ``model`` in place (all ``off`` until :func:`calibrate`); returns the handle.

    ``filter_fn(module, qualified_name)``, if given, selects the weight and activation sites to quantize (for an
    attention tap the module is the attention module).
    """
    config = config or QuantConfig()
    if getattr(model, "_quantization_handle", None) is not None:
        raise ValueError("model is already quantized; call handle.remove() first")
    device = next(model.parameters()).device
    handle = QuantizedModelHandle(model, config)
    weight_estimator, act_estimator = parse_estimator(config.weight_estimator), parse_estimator(config.act_estimator)
    selected = (lambda site: True) if filter_fn is None else (lambda site: filter_fn(site.module, site.name))

    if config.quantize_weights:
        for site in filter(selected, weight_sites(model, config)):
            _quantize_weight(handle, site, weight_estimator, device)
    if config.quantize_acts:
        _use_quantizable_attention(model, handle)
        taps: dict[nn.Module, dict[str, FakeQuantizer]] = {}
        for site in filter(selected, activation_sites(model, config)):
            quantizer = FakeQuantizer(config.act_bits, False, act_estimator).to(device)
            handle.act_quantizers[site.key] = quantizer
            handle.site_kinds[site.key] = site.kind
            if site.where == "output":
                handle.add_hook(site.module.register_forward_hook(_quantize_output(quantizer)))
            elif site.where == "input":
                hook = _quantize_input(quantizer, site.in_place)
                handle.add_hook(site.module.register_forward_pre_hook(hook, with_kwargs=True))
            elif site.where == "sum_with_input_embeddings":
                _quantize_sum_with_input_embeddings(handle, model, site.module, quantizer)
            else:
                taps.setdefault(site.module, {})[site.tap] = quantizer
        for module, quantizers in taps.items():
            _install_taps(handle, module, quantizers)
    model._quantization_handle = handle
    return handle


def _install_taps(handle: QuantizedModelHandle, module: nn.Module, quantizers: dict[str, FakeQuantizer]) -> None:
    previous = getattr(module, "attention_taps", None)
    module.attention_taps = {**(previous or {}), **quantizers}

    def undo() -> None:
        module.attention_taps = previous

    handle._undo.append(undo)


def _quantize_weight(handle: QuantizedModelHandle, site: WeightSite, estimator: Any, device: torch.device) -> None:
    config, module = handle.config, site.module
    kind = UnsignedWhenNonNegative if get_setup(config.setup).unsigned_nonnegative_weights else FakeQuantizer
    quantizer = kind(config.weight_bits, True, estimator, site.channel_axis, cache_frozen=True).to(device)
    parametrize.register_parametrization(module, "weight", quantizer)
    handle.weight_quantizers[f"{site.name}.weight"] = quantizer
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
