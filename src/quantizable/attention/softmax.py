"""Softmax variants that let an attention head do nothing without extreme logits.

Plain softmax can only give a token exactly zero probability in the limit of an infinitely negative score, so a
head that wants to "do nothing" keeps pushing its scores apart and grows activation outliers (paper section 3).
"""

from __future__ import annotations

import torch


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
