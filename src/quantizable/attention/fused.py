"""A fast path for clipped-softmax attention: one autograd node for scores -> clipped probs -> P @ V.

The reference path (``interface._materialised_attention``) is a chain of eager ops: every op reads and writes a
``(B, H, T, T)`` tensor, and autograd keeps the softmax output, the clamp input and the clamped probabilities
alive until backward. This node computes the same values and keeps only the softmax output ``p``:

* forward and backward walk over blocks of query rows, so the elementwise work on a block stays in cache, and
  the blocks' temporaries live in one workspace reused by every block;
* backward recomputes ``clamp(s * p + gamma, 0, 1)`` from ``p``, passes gradient through the clamp with the fused
  ``hardtanh_backward`` kernel and through softmax with ``_softmax_backward_data``, and applies the scalar factors
  (scaling, ``zeta - gamma``, dropout's ``1 / (1 - p)``) to the small ``dO`` block rather than to ``(T, T)`` tensors.

Forward values equal the reference's in float32 (the same ops in the same order per element); gradients agree to
rounding. It covers the training setting: float/bool/no masks, causal masks and attention-probability dropout.
Anything that must see the intermediate tensors (taps, ``output_attentions``) keeps using the reference path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx


def _clip(probs: torch.Tensor, gamma: float, zeta: float, out: torch.Tensor) -> torch.Tensor:
    """``clamp((zeta - gamma) * p + gamma, 0, 1)`` written to ``out``, the same op order as ``clipped_softmax``."""
    return torch.mul(probs, zeta - gamma, out=out).add_(gamma).clamp_(0.0, 1.0)


# Query rows per block: a block's (B, H, rows, T_k) temporaries stay around 1 MiB, inside a CPU core's L2 cache.
BLOCK_ELEMENTS = 2**18


def _row_blocks(query: torch.Tensor, key: torch.Tensor) -> list[slice]:
    batch, heads, q_len, _ = query.shape
    rows = max(1, BLOCK_ELEMENTS // (batch * heads * key.shape[2]))
    return [slice(start, min(start + rows, q_len)) for start in range(0, q_len, rows)]


def _workspace(query: torch.Tensor, key: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    """One flat buffer for a block's (B, H, rows, T_k) temporaries, reused by every block: a fresh large tensor
    per op and block would cost page faults on every allocation."""
    batch, heads = query.shape[:2]
    return query.new_empty(batch * heads * (blocks[0].stop - blocks[0].start) * key.shape[2])


def _view(buffer: torch.Tensor, like: torch.Tensor, rows: slice, key: torch.Tensor) -> torch.Tensor:
    shape = (*like.shape[:2], rows.stop - rows.start, key.shape[2])
    return buffer[: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)


def _rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The mask entries for a block of query rows (a mask broadcast over rows is used whole)."""
    return mask if mask is None or mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., rows, :]


class ClippedSoftmaxAttention(torch.autograd.Function):
    """``dropout(clip(softmax(mask(q @ k^T * scaling)))) @ v`` with only the softmax output saved.

    Forward and backward walk over blocks of query rows so the elementwise work stays in cache; the softmax
    output is saved as one contiguous tensor per block.
    """

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
        scores_shape = (*query.shape[:3], key.shape[2])
        # The dropout mask is drawn for the whole tensor at once, as nn.functional.dropout would draw it.
        keep = query.new_empty(scores_shape).bernoulli_(1.0 - dropout).bool() if dropout > 0.0 else None
        key_t = key.transpose(2, 3)
        outputs, saved_probs = [], []
        blocks = _row_blocks(query, key)
        buffer = _workspace(query, key, blocks)
        for rows in blocks:
            scores = torch.matmul(query[:, :, rows], key_t, out=_view(buffer, query, rows, key)).mul_(scaling)
            block_mask = _rows(mask, rows)
            if block_mask is not None and block_mask.dtype == torch.bool:
                scores.masked_fill_(~block_mask, torch.finfo(scores.dtype).min)
            elif block_mask is not None:
                scores.add_(block_mask)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
            clipped = _clip(probs, gamma, zeta, out=scores)
            if keep is not None:
                clipped.mul_(keep[:, :, rows]).div_(1.0 - dropout)
            outputs.append(torch.matmul(clipped, value))
            saved_probs.append(probs)
        # A fully masked row gets uniform probabilities; the reference's masked_fill then zeroes its gradient.
        dead_rows = None
        if mask is not None and mask.dtype == torch.bool:
            dead_rows = ~mask.amax(dim=-1, keepdim=True)
            dead_rows = dead_rows if dead_rows.any() else None
        ctx.save_for_backward(query, key, value, keep, dead_rows, *saved_probs)
        ctx.params = (scaling, gamma, zeta, dropout)
        return torch.cat(outputs, dim=2)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, keep, dead_rows, *saved_probs = ctx.saved_tensors
        scaling, gamma, zeta, dropout = ctx.params
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
        grad_queries = []
        value_t = value.transpose(2, 3)
        # d scores = scaling * softmax_backward((zeta - gamma) * clamp'(.) * dropout'(.) * (dO @ V^T)): the scalar
        # factors are applied to the small dO block instead of the (rows, T_k) gradient.
        factor = scaling * (zeta - gamma) / (1.0 - dropout)
        blocks = _row_blocks(query, key)
        clipped_buffer, grad_buffer = _workspace(query, key, blocks), _workspace(query, key, blocks)
        for rows, probs in zip(blocks, saved_probs):
            block_grad = grad_output[:, :, rows]
            clipped = _clip(probs, gamma, zeta, out=_view(clipped_buffer, query, rows, key))
            grad_scores = torch.matmul(block_grad * factor, value_t, out=_view(grad_buffer, query, rows, key))
            torch.ops.aten.hardtanh_backward.grad_input(grad_scores, clipped, 0.0, 1.0, grad_input=grad_scores)
            if keep is not None:
                block_keep = keep[:, :, rows]
                grad_scores.mul_(block_keep)
                clipped.mul_(block_keep).div_(1.0 - dropout)
            grad_value.add_(torch.matmul(clipped.transpose(2, 3), block_grad))
            grad_scores = torch.ops.aten._softmax_backward_data.out(
                grad_scores, probs, -1, probs.dtype, grad_input=grad_scores
            )
            if dead_rows is not None:
                grad_scores.masked_fill_(_rows(dead_rows, rows), 0.0)
            grad_queries.append(torch.matmul(grad_scores, key))
            grad_key.add_(torch.matmul(grad_scores.transpose(2, 3), query[:, :, rows]))
        return torch.cat(grad_queries, dim=2), grad_key, grad_value, None, None, None, None, None


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
