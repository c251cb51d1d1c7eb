"""Softmax variants that let an attention head do nothing without extreme logits.

Plain softmax can only give a token exactly zero probability in the limit of an infinitely negative score, so a
head that wants to "do nothing" keeps pushing its scores apart and grows activation outliers (paper section 3).
"""

from __future__ import annotations

import math

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own dtype (float64 stays float64 for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def validate_clip_params(gamma: float, zeta: float) -> None:
    """Raise a ValueError naming the field when the stretch parameters are outside the paper's range."""
    if not gamma <= 0.0:
        raise ValueError(f"gamma must be <= 0 (it stretches softmax below zero), got {gamma}")
    if not zeta >= 1.0:
        raise ValueError(f"zeta must be >= 1 (it stretches softmax above one), got {zeta}")


def gamma_from_alpha(alpha: float, seq_len: int) -> float:
    """The paper's ``gamma = -alpha / T`` parameterisation (section 5.2).

    ``T`` is the *configured* training sequence length (BERT's ``max_seq_length``, OPT's ``block_size``), as in the
    paper's code, not the length of the row being normalised: the same model gets the same gamma at every length.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if seq_len <= 0:
        raise ValueError(f"seq_len (T) must be a positive integer, got {seq_len}")
    return -float(alpha) / float(seq_len)


def clipped_softmax(x: torch.Tensor, gamma: float, zeta: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` (paper eq. 4.1).

    With gamma < 0 a probability below ``-gamma / (zeta - gamma)`` becomes exactly zero, with zero gradient, so a
    head reaches "attend to nothing" with finite logits. The softmax is computed in float32 and cast back.
    """
    validate_clip_params(gamma, zeta)
    probs = torch.softmax(x, dim=dim, dtype=torch.float32)
    if gamma == 0.0 and zeta == 1.0:
        return probs.to(x.dtype)
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0).to(x.dtype)


def softmax_plus_one(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x_i) / (1 + sum_j exp(x_j))`` ("softmax_1", Miller 2023): a comparison no-op mechanism.

    The implicit extra logit of 0 lets a row sum to less than one. Computed stably by including the zero logit in
    the max subtraction.
    """
    x32 = x.float()
    shift = torch.clamp(x32.amax(dim=dim, keepdim=True), min=0.0)
    e = torch.exp(x32 - shift)
    return (e / (torch.exp(-shift) + e.sum(dim=dim, keepdim=True))).to(x.dtype)


def softmax_with_sink(x: torch.Tensor, logit: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x_i) / (exp(s) + sum_j exp(x_j))``: softmax over the row with one more column of logit ``s``, dropped
    after it (gpt-oss's attention sinks). ``logit`` broadcasts against ``x`` with ``dim`` of size 1; ``s = 0`` is
    ``softmax_plus_one``. The shift includes ``s``, so neither large scores nor a large ``s`` overflow. In float32
    (or float64), cast back.
    """
    x32 = x.to(accumulation_dtype(x))
    s = logit.to(x32.dtype)
    shift = torch.maximum(x32.amax(dim=dim, keepdim=True), s).detach()
    e = torch.exp(x32 - shift)
    return (e / (torch.exp(s - shift) + e.sum(dim=dim, keepdim=True))).to(x.dtype)


def sigmoid_attention(x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """``sigmoid(x + b)`` elementwise, no normalisation, ``b = -log T`` (Ramapuram et al. 2024).

    Each weight is independent of the others in its row, so a head does nothing by giving every key a low score;
    the bias makes a row's weights start near ``1/T`` like softmax's. T is ``seq_len`` (the authors' code uses the
    configured maximum length) or, when ``None``, the key length of ``x``'s rows, counted with a tensor op so that
    exported graphs keep it dynamic. Masked (``finfo.min``) entries give exactly 0. In float32 (or float64).
    """
    x32 = x.to(accumulation_dtype(x))
    if seq_len is None:
        log_t = torch.log(torch.ones_like(x32[..., :1, :]).sum(-1, keepdim=True))
    else:
        log_t = math.log(seq_len)
    return torch.sigmoid(x32 - log_t).to(x.dtype)


def softpick(x: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8, dim: int = -1) -> torch.Tensor:
    """``relu(exp(x_i) - 1) / sum_j |exp(x_j) - 1|`` (Zuhri et al. 2025, "rectified softmax").

    A key with ``x <= 0`` gets exactly zero weight, and a row whose keys all score ``<= 0`` is all zero: the head
    does nothing without extreme logits. Computed as in the paper's code, multiplied through by ``exp(-m)`` with
    ``m`` the row max: ``relu(exp(x - m) - exp(-m)) / (sum |exp(x - m) - exp(-m)| + eps)``, so the epsilon acts as
    ``eps * exp(m)`` on the unshifted form. ``m`` is clamped at 0, which changes nothing: a row with ``m < 0`` is
    all zero for any shift (and an all-masked row's ``finfo.min`` gives no ``exp(-m)`` overflow). ``valid``
    (broadcastable bool, True = attend) removes masked keys from numerator and denominator; without it ``x`` must
    hold no masked entries. An all-masked row is 0. In float32 (or float64), cast back.
    """
    x32 = x.to(accumulation_dtype(x))
    shift = x32.amax(dim=dim, keepdim=True).clamp(min=0.0)
    e = torch.exp(x32 - shift) - torch.exp(-shift)
    if valid is not None:
        e = e.masked_fill(~valid, 0.0)
    return (torch.relu(e) / (e.abs().sum(dim=dim, keepdim=True) + eps)).to(x.dtype)
