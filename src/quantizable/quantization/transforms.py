"""Function-preserving weight transforms for the PTQ baselines (``quantization.ptq``): SmoothQuant's per-channel
smoothing of norm -> Linear groups and a randomised Hadamard rotation of the residual stream folded into the weights.
Each checks on a calibration batch that the floating-point logits did not change."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torchao.prototype.smoothquant.core import RunningAbsMaxSmoothQuantObserver

from quantizable.analysis.recording import transformer_blocks
from quantizable.models import family_of_config, is_norm

Batch = dict[str, torch.Tensor]
FP_TOLERANCE = 1e-3  # relative change of the logits a function-preserving transform may cause (float32 rounding)
MIN_SMOOTHING = 1e-5


class NotApplicable(ValueError):
    """A PTQ method cannot be applied to this model (the reason is the message)."""


def pre_ln_refusal(model: nn.Module) -> str | None:
    """Why the residual stream of ``model`` cannot be rotated (None for a pre-LN model)."""
    family = family_of_config(model.config)
    if not family.is_pre_ln(model.config):
        return (f"rotation needs a pre-LN model; {family.name} normalises the residual stream itself (post-LN), "
                "so the norm gain cannot be folded into the weights")
    return None


def _inputs(model: nn.Module, batch: Batch) -> Batch:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def fp_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
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
        fp_logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return consumers


def _base_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    prefix = f"{model.base_model_prefix}."
    return [name for name in names if name.startswith(prefix)]


def check_function(model: nn.Module, batch: Batch, reference: torch.Tensor, what: str) -> float:
    change = float((fp_logits(model, batch) - reference).norm() / reference.norm().clamp(min=1e-12))
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
    reference = fp_logits(model, calibration[0])
    modules = dict(model.named_modules())
    groups = {norm: _base_names(model, linears) for norm, linears in norm_consumers(model, calibration[0]).items()}
    groups = {norm: linears for norm, linears in groups.items() if linears and norm.startswith(model.base_model_prefix)}
    observers = {norm: RunningAbsMaxSmoothQuantObserver(torch.cat([modules[n].weight for n in linears]), alpha)
                 for norm, linears in groups.items()}
    hooks = [modules[norm].register_forward_hook(lambda m, a, out, o=observer: o(out.float()))
             for norm, observer in observers.items()]
    try:
        for batch in calibration:
            fp_logits(model, batch)
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
    change = check_function(model, calibration[0], reference, "smoothquant")
    post_ln = pre_ln_refusal(model) is not None  # its norms also feed the residual
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
    reason = pre_ln_refusal(model)
    if reason is not None:
        raise NotApplicable(reason)
    batch = calibration[0]
    reference = fp_logits(model, batch)
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
    change = check_function(model, batch, reference, "rotation")
    return {"hidden_size": d, "centred": centre, "norms_folded": len(norms), "extra_params": extra,
            "hadamard": True, "fp_relative_change": change}
