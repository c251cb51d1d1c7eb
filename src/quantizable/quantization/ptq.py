"""Post-training-quantization baselines for the W8A8 simulator: can a PTQ method fix a vanilla model?

Each method is one small frozen config (torchao's pattern: a dataclass per method, found by name in ``REGISTRY``)
that knows (a) an optional function-preserving weight transform of the floating-point model before ``quantize_``
(``quantization.transforms``), (b) the options it sets on the installed activation quantizers through the handle
(``FakeQuantizer.configure``) and (c) what it costs at inference:

* ``smoothquant[:ALPHA]`` (Xiao et al. 2023): per input channel ``s = max|x|^alpha / max|W|^(1-alpha)`` for every
  group of Linears fed by one LayerNorm/RMSNorm; ``W <- W * s``, the Linears read ``x / s`` and the norm's output is
  quantized as ``x / s``.
* ``rotation``: a randomised Hadamard rotation of the residual stream (QuaRot / SpinQuant R1) folded into the
  weights. Pre-LN families only.
* ``per_token``: dynamic per-token activation ranges at every site (the "no static ranges" reference).
* ``outlier_fp[:K]``: LLM.int8()-style mixed precision: at every token-feature site the ``K`` channels with the
  largest floating-point calibration range stay in floating point and out of the static range.
* ``prefix[:N]``: the first ``N`` positions (the sink token) stay in floating point and out of every static range
  (PrefixQuant: their keys and values computed in floating point once).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantizable.quantization.calibration import simulate_w8a8
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.placement import QuantizedModelHandle
from quantizable.quantization.transforms import NotApplicable, fp_logits, pre_ln_refusal, rotate_, smooth_

Batch = dict[str, torch.Tensor]
# Sites whose last axis is a feature axis of a (batch, tokens, features) tensor: where outlier channels live.
TOKEN_FEATURE_KINDS = frozenset({"linear", "activation", "gated_product", "norm", "residual", "embedding_sum"})
__all__ = ["METHODS", "REGISTRY", "NotApplicable", "PTQMethod", "parse_ptq", "simulate_ptq"]

REGISTRY: dict[str, type[PTQMethod]] = {}  # method name -> its config class, in the order defined


@dataclass(frozen=True)
class PTQMethod:
    """A PTQ baseline. A subclass registers under its name (``class Rotation(PTQMethod, method="rotation")``),
    sets ``cost`` and may declare one parameter (a ``NAME:VALUE``) whose allowed values are ``bounds`` (closed)."""

    method: ClassVar[str]
    cost: ClassVar[dict[str, str]]  # what the method needs at inference beyond static INT8 (descriptions)
    bounds: ClassVar[tuple[float, float]] = (1, math.inf)

    def __init_subclass__(cls, *, method: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.method = method
        REGISTRY[method] = cls

    def __post_init__(self) -> None:
        field = self.parameter()
        value = None if field is None else getattr(self, field.name)
        low, high = self.bounds
        if value is not None and not low <= value <= high:
            allowed = f"in [{low:g}, {high:g}]" if high < math.inf else f"at least {low:g}"
            raise ValueError(f"{self.method} {self.placeholder()} must be {allowed}, got {value:g} ({self.usage()})")

    @classmethod
    def parameter(cls) -> dataclasses.Field | None:
        fields = dataclasses.fields(cls)
        return fields[0] if fields else None

    @classmethod
    def placeholder(cls) -> str | None:
        """How help and errors name the parameter's value (``ALPHA``, ``K``, ``N``); None without a parameter."""
        field = cls.parameter()
        return None if field is None else field.metadata.get("text", field.name.upper())

    @classmethod
    def usage(cls) -> str:
        """How the method is written: ``NAME`` or ``NAME[:VALUE]`` (e.g. ``prefix[:N]``)."""
        return cls.method if cls.parameter() is None else f"{cls.method}[:{cls.placeholder()}]"

    @property
    def name(self) -> str:
        """``NAME`` or ``NAME:VALUE``, as the user writes it and results are keyed."""
        field = self.parameter()
        if field is None:
            return self.method
        value = getattr(self, field.name)
        text = f"{value:g}"  # 0.5, 1, 8 as users write them; repr where %g would round (0.123456789)
        return f"{self.method}:{text if float(text) == value else repr(value)}"

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``method`` and every registered method's parameter (the others' at their defaults), the
        ``ptq`` record of results files since PTQ had one config for all methods."""
        defaults = {f.name: f.default for cls in REGISTRY.values() for f in dataclasses.fields(cls)}
        return {"name": self.name, "method": self.method, **defaults, **dataclasses.asdict(self)}

    def not_applicable(self, model: nn.Module) -> str | None:
        """Why the method cannot run on ``model`` (None when it can)."""
        return None

    def prepare(self, model: nn.Module, calibration: list[Batch], seed: int) -> tuple[nn.Module, dict[str, Any]]:
        """The floating-point model to quantize (``model`` itself unless the method transforms weights)."""
        return model, {}

    def configure(self, handle: QuantizedModelHandle, calibration: list[Batch], details: dict) -> dict[str, Any]:
        """Set the method's options on the installed activation quantizers before calibration; returns counts."""
        return {}


@dataclass(frozen=True)
class SmoothQuant(PTQMethod, method="smoothquant"):
    alpha: float = 0.5  # migration strength: 0 keeps activations, 1 moves all their range into the weights

    cost = {
        "runtime": "static ranges; pre-LN: none (1/s folded into the norm); post-LN: one per-channel multiply "
                   "before each smoothed quantizer",
        "backend": "any static INT8 backend (ONNX Runtime QDQ measured here, PT2E / X86Inductor)"}
    bounds = (0.0, 1.0)

    def prepare(self, model: nn.Module, calibration: list[Batch], seed: int) -> tuple[nn.Module, dict[str, Any]]:
        target = copy.deepcopy(model)
        return target, smooth_(target, calibration, self.alpha)

    def configure(self, handle: QuantizedModelHandle, calibration: list[Batch], details: dict) -> dict[str, Any]:
        quantizers = handle.act_quantizers
        smoothed = [norm for norm in details["scales"] if f"{norm}:norm" in quantizers]
        for norm in smoothed:  # the norm's output is quantized as the Linears read it: x / s
            quantizers[f"{norm}:norm"].configure(channel_scale=details["scales"][norm])
        return {"smoothed_sites": len(smoothed)}


@dataclass(frozen=True)
class Rotation(PTQMethod, method="rotation"):
    cost = {
        "runtime": "static ranges; norms become gain-free RMS norms, a tied LM head is untied",
        "backend": "any static INT8 backend (weights only change)"}

    def not_applicable(self, model: nn.Module) -> str | None:
        return pre_ln_refusal(model)

    def prepare(self, model: nn.Module, calibration: list[Batch], seed: int) -> tuple[nn.Module, dict[str, Any]]:
        target = copy.deepcopy(model)
        return target, rotate_(target, calibration, seed)


def _sequence_sites(handle: QuantizedModelHandle) -> list[str]:
    """Every activation site but convolutions (whose inputs are not token sequences)."""
    return [key for key in handle.act_quantizers if handle.site_kinds[key] != "conv"]


@dataclass(frozen=True)
class PerToken(PTQMethod, method="per_token"):
    cost = {
        "runtime": "dynamic ranges: a min/max reduction per token before every quantized op",
        "backend": "dynamic-activation INT8 kernels (e.g. torchao Int8DynamicActivationInt8Weight); not ONNX "
                   "Runtime's static QDQ graph"}

    def configure(self, handle: QuantizedModelHandle, calibration: list[Batch], details: dict) -> dict[str, Any]:
        keys = _sequence_sites(handle)
        for key in keys:
            handle.act_quantizers[key].configure(per_token=True)
        return {"configured_sites": len(keys)}


@dataclass(frozen=True)
class OutlierFP(PTQMethod, method="outlier_fp"):
    k: int = 8  # channels per site kept in floating point

    cost = {
        "runtime": "mixed precision: K channels per site in floating point (decomposed matmuls)",
        "backend": "LLM.int8() kernels (bitsandbytes, CUDA); no static INT8 CPU backend"}

    @torch.no_grad()
    def configure(self, handle: QuantizedModelHandle, calibration: list[Batch], details: dict) -> dict[str, Any]:
        quantizers = handle.act_quantizers
        keys = [key for key in quantizers if handle.site_kinds[key] in TOKEN_FEATURE_KINDS]
        handle.set_state(weights="off", acts="off")
        for key in keys:  # a floating-point pass that records each channel's range
            quantizers[key].set_state("observe")
        for batch in calibration:
            fp_logits(handle.model, batch)
        kept = 0
        for key in keys:
            q = quantizers[key]
            if q.channel_absmax is not None:
                channels = q.channel_absmax.topk(min(self.k, q.channel_absmax.numel())).indices
                q.configure(kept_channels=channels)
                kept += channels.numel()
            q.set_state("off")
        return {"k": self.k, "sites_with_kept_channels": len(keys), "kept_channels_total": kept}


@dataclass(frozen=True)
class Prefix(PTQMethod, method="prefix"):
    positions: int = dataclasses.field(default=1, metadata={"text": "N"})  # leading positions (the sink token)

    cost = {
        "runtime": "mixed precision: the first N positions in floating point (decoders: an FP prefix whose KV "
                   "cache is computed once)",
        "backend": "a static INT8 graph for the other positions plus an FP prefix pass; not one ORT graph"}

    def configure(self, handle: QuantizedModelHandle, calibration: list[Batch], details: dict) -> dict[str, Any]:
        selected = [handle.act_quantizers[key] for key in _sequence_sites(handle)]
        for q in selected:
            q.configure(skip_positions=self.positions)

        def sequence_length(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # flattened (B*T, D) tensors (OPT's FFN) need T to find the positions
            ids = kwargs.get("input_ids", args[0] if args else None)
            for q in selected:
                q.sequence_length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

        handle.add_hook(handle.model.register_forward_pre_hook(sequence_length, with_kwargs=True))
        return {"configured_sites": len(selected)}


METHODS = tuple(REGISTRY)


def usage() -> str:
    """Every registered method as it is written: ``smoothquant[:ALPHA], rotation, ..., prefix[:N]``."""
    return ", ".join(cls.usage() for cls in REGISTRY.values())


def parse_ptq(text: str) -> PTQMethod:
    """``NAME`` or ``NAME:VALUE`` of a registered method (``usage()``), e.g. ``smoothquant:0.8``."""
    name, _, value = text.strip().lower().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown PTQ method {text!r}; valid: {usage()}")
    cls = REGISTRY[name]
    field = cls.parameter()
    if not value:
        return cls()
    if field is None:
        raise ValueError(f"PTQ method {name} takes no value, got {text!r} ({cls.usage()})")
    kind = float if field.type in (float, "float") else int
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not {'a number' if kind is float else 'a whole number'} "
                         f"({cls.usage()})") from None
    return cls(number)


def simulate_ptq(
    model: nn.Module,
    calib_batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    eval_batches: Callable[[], Iterable[Batch]] | Iterable[Batch],
    ptq: PTQMethod,
    config: QuantConfig | None = None,
    seeds: Iterable[int] = (0,),
    score: Callable[[nn.Module], dict[str, float]] | None = None,
    fp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``simulate_w8a8`` with the method applied at every seed (transform on that seed's calibration batches,
    then quantizer options); adds the method (``ptq``), its ``cost`` and ``details``. ``model`` is left unchanged.
    Raises :class:`NotApplicable` when the method does not apply."""
    reason = ptq.not_applicable(model)
    if reason is not None:
        raise NotApplicable(reason)
    result = simulate_w8a8(model, calib_batches, eval_batches, config, seeds=seeds, score=score, fp=fp, method=ptq)
    details = result.pop("details")
    details.pop("scales", None)
    for key in ("site_table", "sites", "weight_sites"):  # a PTQ result keeps its own keys (results files)
        result.pop(key)
    return {**result, "ptq": ptq.to_dict(), "cost": {"extra_params": details.get("extra_params", 0), **ptq.cost},
            "details": details}
