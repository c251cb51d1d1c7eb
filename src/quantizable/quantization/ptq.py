"""Post-training-quantization baselines for the W8A8 simulator: can a PTQ method fix a vanilla model?

Each method is (a) an optional weight transform of the floating-point model before ``quantize_`` that keeps its
function (checked on a calibration batch) and (b) options set on the installed activation quantizers through the
handle (``FakeQuantizer.configure``):

* ``smoothquant[:ALPHA]`` (Xiao et al. 2023): per input channel ``s = max|x|^alpha / max|W|^(1-alpha)`` for every
  group of Linears fed by one LayerNorm/RMSNorm (torchao's ``RunningAbsMaxSmoothQuantObserver`` computes ``s``);
  ``W <- W * s``, the Linears read ``x / s`` and the norm's output is quantized as ``x / s``. Pre-LN models fold
  ``1 / s`` into the norm's gain and bias (``smooth_(..., fold=True)``, used for real INT8); post-LN BERT needs it
  as an online per-channel multiply.
* ``rotation``: a randomised Hadamard rotation ``R`` of the residual stream (QuaRot / SpinQuant R1; torchao's
  ``random_hadamard_matrix``) folded into the weights: norm gains and biases go into the Linears they feed, the
  residual writers (embeddings, attention and FFN output projections) become ``R^T W``, the readers ``W R``;
  LayerNorm models are first centred (writers made zero-mean, SliceGPT style) so that every norm becomes an RMS
  normalisation without gain, which commutes with ``R``. Pre-LN families only.
* ``per_token``: dynamic per-token activation ranges at every site (the "no static ranges" reference).
* ``outlier_fp[:K]``: LLM.int8()-style mixed precision: at every token-feature site the ``K`` channels with the
  largest floating-point calibration range stay in floating point and out of the static range.
* ``prefix[:N]``: the first ``N`` positions (the sink token) stay in floating point and out of every static range
  (PrefixQuant: their keys and values computed in floating point once).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchao.prototype.smoothquant.core import RunningAbsMaxSmoothQuantObserver

from quantizable.analysis.recording import transformer_blocks
from quantizable.evaluation import evaluate
from quantizable.models import family_of_config, is_norm
from quantizable.quantization.calibration import _summary, calibrate, freeze
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.placement import QuantizedModelHandle, quantize_

Batch = dict[str, torch.Tensor]
METHODS = ("smoothquant", "rotation", "per_token", "outlier_fp", "prefix")
FP_TOLERANCE = 1e-3  # relative change of the logits a function-preserving transform may cause (float32 rounding)
MIN_SMOOTHING = 1e-5
# Sites whose last axis is a feature axis of a (batch, tokens, features) tensor: where outlier channels live.
TOKEN_FEATURE_KINDS = frozenset({"linear", "activation", "gated_product", "norm", "residual", "embedding_sum"})

# What each method needs at inference beyond static per-tensor INT8 (descriptions, not measurements).
COSTS: dict[str, dict[str, str]] = {
    "smoothquant": {"runtime": "static ranges; pre-LN: none (1/s folded into the norm); post-LN: one per-channel "
                               "multiply before each smoothed quantizer",
                    "backend": "any static INT8 backend (ONNX Runtime QDQ measured here, PT2E / X86Inductor)"},
    "rotation": {"runtime": "static ranges; norms become gain-free RMS norms, a tied LM head is untied",
                 "backend": "any static INT8 backend (weights only change)"},
    "per_token": {"runtime": "dynamic ranges: a min/max reduction per token before every quantized op",
                  "backend": "dynamic-activation INT8 kernels (e.g. torchao Int8DynamicActivationInt8Weight); "
                             "not ONNX Runtime's static QDQ graph"},
    "outlier_fp": {"runtime": "mixed precision: K channels per site in floating point (decomposed matmuls)",
                   "backend": "LLM.int8() kernels (bitsandbytes, CUDA); no static INT8 CPU backend"},
    "prefix": {"runtime": "mixed precision: the first N positions in floating point (decoders: an FP prefix "
                          "whose KV cache is computed once)",
               "backend": "a static INT8 graph for the other positions plus an FP prefix pass; not one ORT graph"},
}


class NotApplicable(ValueError):
    """A PTQ method cannot be applied to this model (the reason is the message)."""


@dataclass(frozen=True)
class PTQConfig:
    """One PTQ baseline: ``method`` and its parameter (``alpha`` for smoothquant, ``k`` for outlier_fp,
    ``positions`` for prefix)."""

    method: str
    alpha: float = 0.5
    k: int = 8
    positions: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown PTQ method {self.method!r}; valid: {', '.join(METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1 or self.positions < 1:
            raise ValueError("outlier_fp K and prefix N must be at least 1")

    @property
    def name(self) -> str:
        value = {"smoothquant": self.alpha, "outlier_fp": self.k, "prefix": self.positions}.get(self.method)
        return self.method if value is None else f"{self.method}:{value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def parse_ptq(text: str) -> PTQConfig:
    """``NAME`` or ``NAME:VALUE``: ``smoothquant[:ALPHA]``, ``rotation``, ``per_token``, ``outlier_fp[:K]``,
    ``prefix[:N]``."""
    name, _, value = text.strip().lower().partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown PTQ method {text!r}; valid: {', '.join(METHODS)} "
                         "(smoothquant:ALPHA, outlier_fp:K, prefix:N take a value)")
    field = {"smoothquant": "alpha", "outlier_fp": "k", "prefix": "positions"}.get(name)
    if not value:
        return PTQConfig(name)
    if field is None:
        raise ValueError(f"PTQ method {name} takes no value, got {text!r}")
    try:
        number = float(value) if field == "alpha" else int(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    return PTQConfig(name, **{field: number})


def check_applicable(model: nn.Module, ptq: PTQConfig) -> str | None:
    """Why ``ptq`` cannot run on ``model`` (None when it can)."""
    if ptq.method != "rotation":
        return None
    family = family_of_config(model.config)
    if not family.is_pre_ln(model.config):
        return (f"rotation needs a pre-LN model; {family.name} normalises the residual stream itself (post-LN), "
                "so the norm gain cannot be folded into the weights")
    return None


def _inputs(model: nn.Module, batch: Batch) -> Batch:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**_inputs(model, batch)).logits.float()
    finally:
        model.train(was_training)


@torch.no_grad()
def norm_consumers(model: nn.Module, batch: Batch) -> dict[str, list[str]]:
    """``{norm name: [Linear names reading its output]}`` from one forward pass: a Linear whose input shares
    storage with a norm's output reads it (views such as ViT's [CLS] slice included)."""
    owners: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps norm outputs alive, so no storage is reused during the pass
    consumers: dict[str, list[str]] = {}
    hooks = []

    def on_norm(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            alive.append(output)
            owners[output.untyped_storage().data_ptr()] = name
        return hook

    def on_linear(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            owner = owners.get(args[0].untyped_storage().data_ptr())
            if owner is not None:
                consumers.setdefault(owner, []).append(name)
        return hook

    for name, module in model.named_modules():
        if is_norm(module):
            hooks.append(module.register_forward_hook(on_norm(name)))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(on_linear(name)))
    try:
        _logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return consumers


def _base_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    prefix = f"{model.base_model_prefix}."
    return [name for name in names if name.startswith(prefix)]


def _check_function(model: nn.Module, batch: Batch, reference: torch.Tensor, what: str) -> float:
    change = float((_logits(model, batch) - reference).norm() / reference.norm().clamp(min=1e-12))
    if not change <= FP_TOLERANCE:
        raise NotApplicable(f"{what} changed the floating-point logits by {change:.2e} (relative, more than "
                            f"{FP_TOLERANCE:g}): something other than a Linear reads a norm's output (e.g. the "
                            "per-head gates of gated attention), so the transform cannot be folded into weights")
    return change


@torch.no_grad()
def smooth_(model: nn.Module, calibration: list[Batch], alpha: float = 0.5, fold: bool = False) -> dict[str, Any]:
    """SmoothQuant in place on the base model's norm -> Linear groups; returns ``{"scales": {norm: s}, ...}``.

    ``fold=False`` (the simulator): the Linears read ``x / s`` through a forward pre-hook, the norm is untouched
    (set its output quantizer's ``channel_scale`` to ``s``: :func:`configure`). ``fold=True``: ``1 / s`` goes into
    the norm's gain and bias, no hooks (pre-LN models, whose norms feed only Linears; for export).
    """
    reference = _logits(model, calibration[0])
    modules = dict(model.named_modules())
    groups = {norm: _base_names(model, linears) for norm, linears in norm_consumers(model, calibration[0]).items()}
    groups = {norm: linears for norm, linears in groups.items() if linears and norm.startswith(model.base_model_prefix)}
    observers = {norm: RunningAbsMaxSmoothQuantObserver(torch.cat([modules[n].weight for n in linears]), alpha)
                 for norm, linears in groups.items()}
    hooks = [modules[norm].register_forward_hook(lambda m, a, out, o=observer: o(out.float()))
             for norm, observer in observers.items()]
    try:
        for batch in calibration:
            _logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    scales = {}
    for norm, linears in groups.items():
        s = observers[norm].compute_smoothing_factor().clamp(min=MIN_SMOOTHING)
        scales[norm] = s
        for name in linears:
            linear = modules[name]
            linear.weight.mul_(s.to(linear.weight))
            if not fold:
                linear.register_forward_pre_hook(lambda m, args, s=s: (args[0] / s.to(args[0]), *args[1:]))
        if fold:
            norm_module = modules[norm]
            norm_module.weight.div_(s.to(norm_module.weight))
            if getattr(norm_module, "bias", None) is not None:
                norm_module.bias.div_(s.to(norm_module.bias))
    change = _check_function(model, calibration[0], reference, "smoothquant")
    post_ln = check_applicable(model, PTQConfig("rotation")) is not None  # its norms also feed the residual
    return {"scales": scales, "groups": len(groups), "fp_relative_change": change,
            "extra_params": sum(s.numel() for s in scales.values()) if post_ln else 0}


class FoldedRMSNorm(nn.Module):
    """RMS normalisation without gain or bias: a (centred) LayerNorm or an RMSNorm after its gain and bias went
    into the Linears it feeds. It commutes with an orthogonal rotation of its input."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def rotation_matrix(size: int, seed: int) -> torch.Tensor:
    """A random orthogonal ``size x size`` matrix (float64): torchao's randomised Hadamard where ``size`` is a
    power of two times one of its Hadamard orders, else the QR factor of a Gaussian matrix."""
    # imported here: importing spinquant prints a note about a GPU kernel on every run, rotation or not
    from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix

    try:
        return random_hadamard_matrix(size, "cpu", seed=seed).double()
    except AssertionError:
        generator = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def rotate_(model: nn.Module, calibration: list[Batch], seed: int = 0) -> dict[str, Any]:
    """Fold a random Hadamard rotation of the residual stream into the weights of a pre-LN model, in place."""
    reason = check_applicable(model, PTQConfig("rotation"))
    if reason is not None:
        raise NotApplicable(reason)
    batch = calibration[0]
    reference = _logits(model, batch)
    modules = dict(model.named_modules())
    consumers = norm_consumers(model, batch)
    base = model.base_model_prefix
    norms = [name for name, m in modules.items() if is_norm(m) and name.startswith(f"{base}.")]
    missing = [name for name in norms if name not in consumers]
    if missing:
        raise NotApplicable(f"rotation: norm {missing[0]} feeds no Linear; unsupported architecture")
    d = model.config.hidden_size
    blocks = transformer_blocks(model)
    writers = [m for b in blocks for m in (b.attention_output[1], b.ffn_output[1])]
    embeddings = [m for name, m in modules.items() if isinstance(m, nn.Embedding) and name.startswith(f"{base}.")]
    convs = [m for name, m in modules.items() if isinstance(m, nn.Conv2d) and name.startswith(f"{base}.")]
    vectors = [p for name, m in modules.items() if name.startswith(f"{base}.") and name.endswith("embeddings")
               for p in m.parameters(recurse=False) if p.shape[-1] == d]  # ViT: [CLS] token, position embeddings
    readers = [modules[n] for norm in norms for n in consumers[norm]]
    extra = 0
    for linear in readers:  # untie an LM head from the embeddings: they get different transforms
        if any(linear.weight is e.weight for e in embeddings):
            linear.weight = nn.Parameter(linear.weight.detach().clone())
            model.config.tie_word_embeddings = False
            extra += linear.weight.numel()
    centre = any(isinstance(modules[n], nn.LayerNorm) for n in norms)
    r = rotation_matrix(d, seed)

    def centred_rows(w: torch.Tensor) -> torch.Tensor:  # each row a residual-stream vector
        w = w.double()
        return w - w.mean(dim=-1, keepdim=True) if centre else w

    for e in embeddings:
        _set(e.weight, centred_rows(e.weight) @ r)
    for p in vectors:
        _set(p, centred_rows(p) @ r)
    for module in [*writers, *convs]:  # output axis 0 is the residual stream
        w = module.weight.double().reshape(d, -1)
        w = w - w.mean(dim=0, keepdim=True) if centre else w
        _set(module.weight, (r.T @ w).reshape(module.weight.shape))
        if module.bias is not None:
            _set(module.bias, r.T @ centred_rows(module.bias))
    for norm in norms:
        module = modules[norm]
        gain = module.weight.double() if getattr(module, "weight", None) is not None else torch.ones(d).double()
        shift = getattr(module, "bias", None)
        for name in consumers[norm]:
            linear = modules[name]
            w = linear.weight.double()
            if shift is not None:
                bias = (linear.bias.double() if linear.bias is not None else 0.0) + w @ shift.double()
                if linear.bias is None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                           device=linear.weight.device))
                _set(linear.bias, bias)
            _set(linear.weight, (w * gain) @ r)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        parent, _, attr = norm.rpartition(".")
        setattr(model.get_submodule(parent), attr, FoldedRMSNorm(float(eps)).to(next(model.parameters()).device))
    change = _check_function(model, batch, reference, "rotation")
    return {"hidden_size": d, "centred": centre, "norms_folded": len(norms), "extra_params": extra,
            "hadamard": True, "fp_relative_change": change}


def prepare(model: nn.Module, ptq: PTQConfig, calibration: list[Batch], seed: int = 0) -> tuple[nn.Module, dict]:
    """The floating-point model to quantize: a transformed copy for smoothquant and rotation, else ``model``."""
    if ptq.method == "smoothquant":
        target = copy.deepcopy(model)
        return target, smooth_(target, calibration, ptq.alpha)
    if ptq.method == "rotation":
        target = copy.deepcopy(model)
        return target, rotate_(target, calibration, seed)
    return model, {}


@torch.no_grad()
def configure(handle: QuantizedModelHandle, ptq: PTQConfig, calibration: list[Batch], details: dict) -> dict:
    """Set the method's options on the installed activation quantizers (before calibration); returns what was
    set (counts, kept channels)."""
    quantizers, kinds = handle.act_quantizers, handle.site_kinds
    if ptq.method == "smoothquant":
        for norm, s in details["scales"].items():
            key = f"{norm}:norm"
            if key in quantizers:
                quantizers[key].configure(channel_scale=s)
        return {"smoothed_sites": sum(f"{norm}:norm" in quantizers for norm in details["scales"])}
    if ptq.method in ("per_token", "prefix"):
        keys = [key for key in quantizers if kinds[key] != "conv"]
        for key in keys:
            if ptq.method == "per_token":
                quantizers[key].configure(per_token=True)
            else:
                quantizers[key].configure(skip_positions=ptq.positions)
        if ptq.method == "prefix":  # flattened (B*T, D) tensors (OPT's FFN) need T to find the positions
            selected = [quantizers[key] for key in keys]

            def sequence_length(module: nn.Module, args: tuple, kwargs: dict) -> None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                for q in selected:
                    q.sequence_length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

            handle._hooks.append(handle.model.register_forward_pre_hook(sequence_length, with_kwargs=True))
        return {"configured_sites": len(keys)}
    if ptq.method == "outlier_fp":
        keys = [key for key in quantizers if kinds[key] in TOKEN_FEATURE_KINDS]
        handle.set_state(weights="off", acts="off")
        for key in keys:
            quantizers[key].set_state("observe")
        for batch in calibration:
            _logits(handle.model, batch)
        kept = 0
        for key in keys:
            q = quantizers[key]
            if q.channel_absmax is not None:
                channels = q.channel_absmax.topk(min(ptq.k, q.channel_absmax.numel())).indices
                q.configure(kept_channels=channels)
                kept += channels.numel()
            q.set_state("off")
        return {"k": ptq.k, "sites_with_kept_channels": len(keys), "kept_channels_total": kept}
    return {}


def simulate_ptq(
    model: nn.Module,
    calib_batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    eval_batches: Callable[[], Iterable[Batch]] | Iterable[Batch],
    ptq: PTQConfig,
    config: QuantConfig | None = None,
    seeds: Iterable[int] = (0,),
    score: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """FP evaluation, then per seed: ``prepare`` (on that seed's calibration batches), ``quantize_``,
    ``configure``, calibrate, freeze, evaluate (and ``score``, as in ``simulate_w8a8``). ``model`` is left in
    floating point and unchanged."""
    config = config or QuantConfig()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")

    def fresh_eval() -> Iterable[Batch]:
        return eval_batches() if callable(eval_batches) else eval_batches

    fp = evaluate(model, fresh_eval())
    scores: dict[str, Any] = {"fp": score(model), "per_seed": []} if score is not None else {}
    per_seed, details = [], {}
    for seed in seeds:
        torch.manual_seed(seed)
        calibration = list(calib_batches(seed) if callable(calib_batches) else calib_batches)
        target, details = prepare(model, ptq, calibration, seed)
        handle = quantize_(target, config)
        try:
            details = {**details, **configure(handle, ptq, calibration, details)}
            calibrate(target, calibration)
            freeze(target)
            per_seed.append(evaluate(target, fresh_eval())["value"])
            if score is not None:
                scores["per_seed"].append(score(target))
        finally:
            handle.remove()
    details.pop("scales", None)
    return {
        "metric": fp["metric"],
        "fp": fp["value"],
        "quantized": _summary(per_seed),
        "seeds": seeds,
        "ptq": ptq.to_dict(),
        "cost": {"extra_params": details.get("extra_params", 0), **COSTS[ptq.method]},
        "details": details,
        "config": config.to_dict(),
        **({"scores": scores} if score is not None else {}),
    }
