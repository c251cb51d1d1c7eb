"""A fast path for clipped-softmax attention: one op for scores -> clipped probs -> P @ V.

The reference path (``interface._materialised_attention``) is a chain of eager ops: every op reads and writes a
``(B, H, T, T)`` tensor, and autograd keeps the softmax output, the clamp input and the clamped probabilities
alive until backward. This node computes the same values and keeps only the softmax output ``p``:

* forward and backward walk over blocks of query rows, so the elementwise work on a block stays in cache, and
  the blocks' temporaries live in one workspace reused by every block;
* backward recomputes ``clamp(s * p + gamma, 0, 1)`` from ``p``, passes gradient through the clamp with the fused
  ``hardtanh_backward`` kernel and through softmax with ``_softmax_backward_data``, and applies the scalar factors
  (scaling, ``zeta - gamma``, dropout's ``1 / (1 - p)``) to the small ``dO`` block rather than to ``(T, T)`` tensors.

On CPU in float32 the elementwise work of a block (scale, key-padding or causal mask, softmax, clip; in backward
the clamp's and softmax's gradients) runs in the C row kernel of ``attention.cpu_kernel``, one sweep per row in L1
cache, instead of ten-odd ATen passes; elsewhere, or without a C compiler, the ATen ops above do it. Values equal
the reference's to float rounding (the ATen ops: exactly in forward). It covers the training setting: float/bool/no
masks, causal masks and attention-probability dropout. Anything that must see the intermediate tensors (taps,
``output_attentions``) keeps using the reference path.

Forward and backward are the custom ops ``quantizable::clipped_softmax_attention`` and ``..._backward``, so
``torch.compile`` keeps the whole attention as one node of its graph and ``torch.export`` traces it.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import FunctionCtx

from quantizable.attention.cpu_kernel import clipped_softmax_rows, clipped_softmax_rows_backward, kernel_applies


def _clip(probs: torch.Tensor, gamma: float, zeta: float, out: torch.Tensor) -> torch.Tensor:
    """``clamp((zeta - gamma) * p + gamma, 0, 1)`` written to ``out``, the same op order as ``clipped_softmax``."""
    return torch.mul(probs, zeta - gamma, out=out).add_(gamma).clamp_(0.0, 1.0)


# Query rows per block: blocks of up to 2 MiB of scores. Smaller blocks keep more in cache but make thinner matrix
# products, which cost more than they save (clipped attention at T=512: 1.06x SDPA's time with 2^19, 1.09x with 2^18,
# 1.31x with 2^16, 1.22x with a single (T, T) block).
BLOCK_ELEMENTS = 2**19


def _row_blocks(query: torch.Tensor, key: torch.Tensor) -> list[slice]:
    """Equal blocks of query rows (a short last block would cost a full set of calls for a few rows)."""
    batch, heads, q_len, _ = query.shape
    most = max(1, BLOCK_ELEMENTS // (batch * heads * key.shape[2]))
    count = -(-q_len // most)
    rows = -(-q_len // count)
    return [slice(start, min(start + rows, q_len)) for start in range(0, q_len, rows)]


def _join(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


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


def _key_bias(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A ``(B or 1, 1, 1, T_k)`` mask as the kernel's contiguous ``(B, T_k)`` additive bias."""
    lowest = torch.finfo(torch.float32).min  # finite: the kernel is built for finite inputs
    bias = torch.where(mask, 0.0, lowest) if mask.dtype == torch.bool else mask.float().clamp(min=lowest)
    return bias.expand(batch, 1, 1, mask.shape[-1]).reshape(batch, mask.shape[-1]).contiguous()


def _kernel_masks(mask: torch.Tensor, q_len: int, k_len: int) -> tuple[torch.Tensor | None, bool]:
    """``(per-key mask, causal)`` that together equal ``mask``, or ``(None, False)`` when it is not of that form.

    transformers hands attention a materialised ``(B, 1, T_q, T_k)`` boolean mask whenever a batch has padding:
    padding alone repeats one row of keys for every query, padding plus causality is that row cut at the
    diagonal. Recognising both (two boolean comparisons) lets the kernel apply them per row instead of ATen
    writing the whole float score tensor twice.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        return None, False
    if mask.shape[2] == 1:
        return mask, False
    if mask.dtype != torch.bool or q_len > k_len:
        return None, False
    keys = mask[:, :, -1:, :]  # the last query sees every key it may see, causal or not
    if torch.equal(mask, keys.expand_as(mask)):
        return keys, False
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    if torch.equal(mask, keys & causal):
        return keys, True
    return None, False


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """A sum over row blocks that takes the first block's tensor as it is (no zeroed buffer to add it to)."""
    return part if total is None else total.add_(part)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores.add_(mask)


def _prob_blocks(probs: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 blocks: list[slice]) -> list[torch.Tensor]:
    """The row blocks' softmax outputs as views of one flat tensor, block after block, each contiguous."""
    views, offset = [], 0
    for rows in blocks:
        shape = (*query.shape[:2], rows.stop - rows.start, key.shape[2])
        size = shape[0] * shape[1] * shape[2] * shape[3]
        views.append(probs[offset: offset + size].view(shape))
        offset += size
    return views


def _softmax(scores: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, -1)`` into ``out``: in float32 the very op the reference runs, in half precision
    through float32 as the reference does."""
    if scores.dtype in (torch.float32, torch.float64):
        return torch.ops.aten._softmax.out(scores, -1, False, out=out)
    return out.copy_(torch.softmax(scores, dim=-1, dtype=torch.float32))


# The fast path as two custom ops (forward, backward) rather than an autograd.Function: torch.compile then keeps our
# attention as one node of its graph instead of breaking the graph there, and torch.export traces a model with it.
# Each op computes its own outputs from its inputs alone (no aliasing, nothing mutated), as custom ops must.
@torch.library.custom_op("quantizable::clipped_softmax_attention", mutates_args=())
def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float, gamma: float, zeta: float, dropout: float,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, softmax output of every row block (flat), dropout's keep mask (or an empty tensor))`` for
    contiguous ``query``, ``key``, ``value``."""
    scores_shape = (*query.shape[:3], key.shape[2])
    q_len, k_len = scores_shape[2:]
    kernel = kernel_applies(query)
    causal = causal and mask is None and q_len > 1
    if causal and not (kernel and q_len <= k_len):  # the kernel takes causality as a flag, ATen as a mask
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        causal = False
    key_bias = None
    if kernel and mask is not None:
        keys, mask_causal = _kernel_masks(mask, q_len, k_len)
        if keys is not None:
            key_bias, causal = _key_bias(keys, query.shape[0]), mask_causal
    # The dropout mask is drawn for the whole tensor at once, as nn.functional.dropout would draw it.
    keep = (query.new_empty(scores_shape).bernoulli_(1.0 - dropout).bool() if dropout > 0.0
            else query.new_empty(0, dtype=torch.bool))
    key_t = key.transpose(2, 3)
    outputs = []
    blocks = _row_blocks(query, key)
    buffer = _workspace(query, key, blocks)
    probs = query.new_empty(math.prod(scores_shape))
    for rows, block_probs in zip(blocks, _prob_blocks(probs, query, key, blocks)):
        scores = torch.matmul(query[:, :, rows], key_t, out=_view(buffer, query, rows, key))
        if kernel:
            scale = scaling
            if mask is not None and key_bias is None:  # a general mask: applied by ATen, scaled first
                _apply_mask(scores.mul_(scaling), _rows(mask, rows))
                scale = 1.0
            clipped_softmax_rows(scores, scale, gamma, zeta, key_bias, causal, rows.start, k_len - q_len,
                                 probs=block_probs)
            clipped = scores
        else:
            _apply_mask(scores.mul_(scaling), _rows(mask, rows))
            clipped = _clip(_softmax(scores, out=block_probs), gamma, zeta, out=scores)
        if dropout > 0.0:
            clipped.mul_(keep[:, :, rows]).div_(1.0 - dropout)
        outputs.append(torch.matmul(clipped, value))
    return _join(outputs), probs, keep


@_attention.register_fake
def _(query, key, value, mask, scaling, gamma, zeta, dropout, causal):
    scores_shape = (*query.shape[:3], key.shape[2])
    keep_shape = scores_shape if dropout > 0.0 else (0,)
    return (query.new_empty((*query.shape[:3], value.shape[3])), query.new_empty(math.prod(scores_shape)),
            query.new_empty(keep_shape, dtype=torch.bool))


@torch.library.custom_op("quantizable::clipped_softmax_attention_backward", mutates_args=())
def _attention_backward(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None, probs: torch.Tensor, keep: torch.Tensor, scaling: float,
                        gamma: float, zeta: float, dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(query, key, value)`` of ``_attention`` for a contiguous ``grad_output``."""
    kernel = kernel_applies(query)
    keep = keep if dropout > 0.0 else None
    # A fully masked row gets uniform probabilities; the reference's masked_fill then zeroes its gradient.
    dead_rows = None
    if mask is not None and mask.dtype == torch.bool:
        dead_rows = ~mask.amax(dim=-1, keepdim=True)
        dead_rows = dead_rows if dead_rows.any() else None
    grad_key = grad_value = None
    grad_queries = []
    value_t = value.transpose(2, 3)
    # d scores = scaling * softmax_backward((zeta - gamma) * clamp'(.) * dropout'(.) * (dO @ V^T)): the scalar
    # factors are applied in the kernel's row sweep, or by ATen to the small dO block, never as a (T, T) pass.
    factor = scaling * (zeta - gamma) / (1.0 - dropout)
    blocks = _row_blocks(query, key)
    clipped_buffer, grad_buffer = _workspace(query, key, blocks), _workspace(query, key, blocks)
    for rows, block_probs in zip(blocks, _prob_blocks(probs, query, key, blocks)):
        block_grad = grad_output[:, :, rows]
        clipped = _view(clipped_buffer, query, rows, key)
        grad_scores = _view(grad_buffer, query, rows, key)
        if kernel:
            torch.matmul(block_grad, value_t, out=grad_scores)
            block_keep = None if keep is None else keep[:, :, rows].contiguous().view(torch.uint8)
            clipped_softmax_rows_backward(grad_scores, block_probs, clipped, gamma, zeta, factor, block_keep,
                                          1.0 / (1.0 - dropout))
        else:
            torch.matmul(block_grad * factor, value_t, out=grad_scores)
            _clip(block_probs, gamma, zeta, out=clipped)
            torch.ops.aten.hardtanh_backward.grad_input(grad_scores, clipped, 0.0, 1.0, grad_input=grad_scores)
            if keep is not None:
                block_keep = keep[:, :, rows]
                grad_scores.mul_(block_keep)
                clipped.mul_(block_keep).div_(1.0 - dropout)
            grad_scores = torch.ops.aten._softmax_backward_data.out(
                grad_scores, block_probs, -1, block_probs.dtype, grad_input=grad_scores
            )
        grad_value = _accumulate(grad_value, torch.matmul(clipped.transpose(2, 3), block_grad))
        if dead_rows is not None:
            grad_scores.masked_fill_(_rows(dead_rows, rows), 0.0)
        grad_queries.append(torch.matmul(grad_scores, key))
        grad_key = _accumulate(grad_key, torch.matmul(grad_scores.transpose(2, 3), query[:, :, rows]))
    return _join(grad_queries), grad_key, grad_value


@_attention_backward.register_fake
def _(grad_output, query, key, value, mask, probs, keep, scaling, gamma, zeta, dropout):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
    query, key, value, mask, scaling, gamma, zeta, dropout, _ = inputs
    _, probs, keep = output
    ctx.mark_non_differentiable(probs, keep)
    # only a boolean mask is needed in backward (its fully masked rows)
    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None
    ctx.save_for_backward(query, key, value, bool_mask, probs, keep)
    ctx.params = (scaling, gamma, zeta, dropout)


def _backward(ctx: FunctionCtx, grad_output: torch.Tensor, _probs: None, _keep: None) -> tuple:
    query, key, value, mask, probs, keep = ctx.saved_tensors
    grads = _attention_backward(grad_output.contiguous(), query, key, value, mask, probs, keep, *ctx.params)
    return *grads, None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def clipped_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    gamma: float,
    zeta: float,
    dropout: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """Clipped-softmax attention ``(B, H, T, d_head)`` with the memory of one saved probability tensor.

    ``attention_mask`` is ``None``, a boolean keep-mask or an additive float mask broadcastable to the scores;
    ``is_causal`` (with no mask) masks keys after each query, aligned at the end as in SDPA; ``key``/``value``
    must already have the query's number of heads. ``dropout`` is applied as given (pass 0 in eval).
    """
    # contiguous once, here, rather than inside every block's matmul (and again in backward)
    output, _, _ = _attention(query.contiguous(), key.contiguous(), value.contiguous(), attention_mask, scaling,
                              gamma, zeta, dropout, is_causal)
    return output
