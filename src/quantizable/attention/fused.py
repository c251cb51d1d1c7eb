"""A fast path for clipped-softmax attention: one autograd node for scores -> clipped probs -> P @ V.

The reference path (``interface._materialised_attention``) is a chain of eager ops, and autograd keeps the
softmax output, the clamp input and the clamped probabilities (three ``(B, H, T, T)`` tensors) alive until
backward. This node computes the same values with in-place ops and keeps only the softmax output ``p``: the
clipped probabilities ``clamp(s * p + gamma, 0, 1)`` and the clamp's pass-through mask are recomputed from ``p`` in
backward (elementwise, cheap next to the matmuls), and the softmax backward is the fused
``aten._softmax_backward_data`` kernel. Forward values are bit-identical to the reference in float32; gradients
agree to rounding.

It covers the training setting: float/bool/no masks, causal masks and attention-probability dropout. Anything
that must see the intermediate tensors (taps, ``output_attentions``) keeps using the reference path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx


def _clip(probs: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """``clamp((zeta - gamma) * p + gamma, 0, 1)`` in a fresh tensor, the same op order as ``clipped_softmax``."""
    return (probs * (zeta - gamma)).add_(gamma).clamp_(0.0, 1.0)


class ClippedSoftmaxAttention(torch.autograd.Function):
    """``dropout(clip(softmax(mask(q @ k^T * scaling)))) @ v`` with a single ``(B, H, T, T)`` tensor saved."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        gamma: float,
        zeta: float,
        dropout: float,
    ) -> torch.Tensor:
        scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
        bool_mask = mask is not None and mask.dtype == torch.bool
        if bool_mask:
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        elif mask is not None:
            scores.add_(mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        del scores
        clipped = _clip(probs, gamma, zeta)
        if dropout > 0.0:
            clipped = torch.nn.functional.dropout(clipped, p=dropout, training=True)
        output = torch.matmul(clipped, value)
        # A fully masked row gets uniform probabilities; the reference's masked_fill then zeroes its gradient.
        dead_rows = (~mask).all(dim=-1, keepdim=True) if bool_mask and not mask.any(dim=-1).all() else None
        # With dropout the dropped probabilities are saved too: wherever the clamp passes gradient they are
        # non-zero exactly where dropout kept the entry, so they also stand in for the dropout mask.
        ctx.save_for_backward(query, key, value, probs, clipped if dropout > 0.0 else None, dead_rows)
        ctx.params = (scaling, gamma, zeta, dropout)
        return output

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, probs, dropped, dead_rows = ctx.saved_tensors
        scaling, gamma, zeta, dropout = ctx.params
        clipped = _clip(probs, gamma, zeta)
        if dropped is None:
            dropped = clipped
        grad_value = torch.matmul(dropped.transpose(2, 3), grad_output)
        grad_clipped = torch.matmul(grad_output, value.transpose(2, 3))
        passes = (clipped > 0.0).logical_and_(clipped < 1.0)
        if dropout > 0.0:
            passes.logical_and_(dropped != 0.0)
            grad_clipped.mul_(1.0 / (1.0 - dropout))
        del clipped
        grad_probs = grad_clipped.mul_(passes).mul_(zeta - gamma)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        if dead_rows is not None:
            grad_scores.masked_fill_(dead_rows, 0.0)
        grad_scores.mul_(scaling)
        grad_query = torch.matmul(grad_scores, key) if ctx.needs_input_grad[0] else None
        grad_key = torch.matmul(grad_scores.transpose(2, 3), query) if ctx.needs_input_grad[1] else None
        return grad_query, grad_key, grad_value, None, None, None, None, None


def clipped_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    gamma: float,
    zeta: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Clipped-softmax attention ``(B, H, T, d_head)`` with the memory of one saved probability tensor.

    ``attention_mask`` is ``None``, a boolean keep-mask or an additive float mask broadcastable to the scores;
    ``key``/``value`` must already have the query's number of heads. ``dropout`` is applied as given (pass 0 in eval).
    """
    return ClippedSoftmaxAttention.apply(query, key, value, attention_mask, scaling, gamma, zeta, dropout)
