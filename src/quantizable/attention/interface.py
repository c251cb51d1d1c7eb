"""One attention function for every Hugging Face family, registered through ``AttentionInterface``.

Hugging Face attention modules (BERT, OPT, ViT, Llama, ...) project q/k/v themselves and then call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)``. Registering ``quantizable``
there lets us change only the part between the projections and the output projection, for all families at once:

* softmax on fused SDPA (vanilla), or materialised probabilities for clipped softmax / softmax+1 / sigmoid /
  softpick; clipped softmax takes the single-node fast path of ``attention.fused`` unless taps need the
  intermediates or ``fused_attention(False)`` selects the reference ops (as does torch.compile by default:
  ``switch.compiled_fast_paths``);
* the no-op parameters of ``attention.no_op``: a sink key/value column (``sink_token``, ``key_bias``) that SDPA sees
  as one more key every query may attend to, the value gate (``value_gate``) applied to the values before SDPA, and
  the learned extra softmax column of ``sink_logit`` (materialised);
* an optional per-head gate on the attention output, computed from the module's input hidden state, which a
  forward pre-hook passes down as the keyword ``attn_gate_input`` (the linear gate is one fused node on CPU);
* named *taps* (``scores``, ``probs``, ``context``; ``ungated_context``, the context before the gate of a gated
  module) where quantizers and analysis hooks observe or replace the internal tensors; a module with taps on ``scores``/``probs`` takes the materialised path. Taps always see the
  ``(B, H, T_q, T_k)`` token columns; the sink column's probability stays in floating point.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from quantizable.attention.fused import clipped_softmax_attention
from quantizable.attention.softmax import (accumulation_dtype, clipped_softmax, sigmoid_attention, softmax_plus_one,
                                           softmax_with_sink, softpick)
from quantizable.attention.spec import AttentionSpec
from quantizable.attention.switch import fast_paths_apply, fused_attention

ATTN_IMPLEMENTATION = "quantizable"
TAP_NAMES = ("scores", "probs", "context")

Tap = Callable[[torch.Tensor], torch.Tensor]


def _spec_of(module: nn.Module) -> AttentionSpec:
    return getattr(module, "attention_spec", None) or AttentionSpec()


def _tap(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    taps: dict[str, Tap] | None = getattr(module, "attention_taps", None)
    if taps and name in taps:
        return taps[name](x)
    return x


def normalise(scores: torch.Tensor, spec: AttentionSpec, valid: torch.Tensor | None = None,
              sink_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Turn masked, scaled scores into attention probabilities according to the spec (``valid``: the keys a query
    may attend, for softpick, whose masked entries must drop out of its denominator; ``sink_logit``: the ``(H, 1, 1)``
    extra column of ``sink_logit``)."""
    if spec.kind == "clipped_softmax":
        return clipped_softmax(scores, spec.resolved_gamma(), spec.zeta)
    if spec.kind == "softmax_plus_one":
        return softmax_plus_one(scores)
    if spec.kind == "sink_logit":
        return softmax_with_sink(scores, sink_logit)
    if spec.kind == "sigmoid":
        return sigmoid_attention(scores, spec.seq_len)
    if spec.kind == "softpick":
        return softpick(scores, valid, spec.eps)
    return torch.softmax(scores, dim=-1, dtype=accumulation_dtype(scores)).to(scores.dtype)


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """The bottom-right aligned causal mask (a query sees every key up to its own position), True = attend."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def with_sink_column(mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool,
                     device: torch.device) -> torch.Tensor | None:
    """The attention mask with one more key column that every query may attend (causal and padded rows too)."""
    if mask is None:
        if not (causal and q_len > 1):
            return None
        mask = _causal_mask(q_len, k_len, device)
    column = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([mask, column((*mask.shape[:-1], 1), dtype=mask.dtype, device=mask.device)], dim=-1)


def _materialised_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    is_causal: bool,
    fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    spec = _spec_of(module)
    if fast:
        p_drop = dropout if module.training else 0.0
        context = clipped_softmax_attention(
            query, key, value, attention_mask, scaling, spec.resolved_gamma(), spec.zeta, p_drop, is_causal
        )
        return context, None
    if attention_mask is None and is_causal and query.shape[2] > 1:
        attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
    scores = _tap(module, "scores", torch.matmul(query, key.transpose(2, 3)) * scaling)
    valid = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            valid = attention_mask
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            valid = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            scores = scores + attention_mask
    sink = getattr(module, "attn_sink", None)
    if sink is None:
        sink_logit = getattr(module, "attn_sink_logit", None)
        probs = _tap(module, "probs", normalise(scores, spec, valid, None if sink_logit is None else sink_logit.column()))
        dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
        return torch.matmul(dropped, value), probs
    # softmax over the tokens and the sink column; the taps see the token columns
    sink_key, sink_value = (repeat_kv(t, groups) for t in sink.columns(key))
    sink_scores = torch.matmul(query, sink_key.transpose(2, 3)) * scaling
    full = torch.cat([scores, sink_scores], dim=-1)
    full = torch.softmax(full, dim=-1, dtype=accumulation_dtype(full)).to(scores.dtype)
    probs = _tap(module, "probs", full[..., :-1])
    dropped = nn.functional.dropout(torch.cat([probs, full[..., -1:]], dim=-1), p=dropout, training=module.training)
    return torch.matmul(dropped, torch.cat([value, sink_value], dim=2)), probs


def quantizable_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    attn_gate_input: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for ``attn_implementation="quantizable"``; returns ``(output (B, T, H, d_head), probs or None)``."""
    spec = _spec_of(module)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    taps = getattr(module, "attention_taps", None) or {}
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else is_causal
    observed = "scores" in taps or "probs" in taps or bool(kwargs.get("output_attentions"))
    value_gate = getattr(module, "attn_value_gate", None)
    if value_gate is not None:
        value = value_gate(value)
    sink = getattr(module, "attn_sink", None)
    if spec.needs_probabilities or observed:
        fast = fast_paths_apply() and spec.kind == "clipped_softmax" and not observed
        context, probs = _materialised_attention(
            module, query, key, value, attention_mask, scaling, dropout, causal, fast
        )
        output = context.transpose(1, 2)
    elif sink is not None:  # SDPA with the sink as one more key/value column
        mask = with_sink_column(attention_mask, query.shape[2], key.shape[2], causal, query.device)
        sink_key, sink_value = sink.columns(key)
        key, value = torch.cat([key, sink_key], dim=2), torch.cat([value, sink_value], dim=2)
        output, probs = sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    else:
        output, probs = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    gate = getattr(module, "attn_gate", None)
    if gate is not None:
        if attn_gate_input is None:
            raise RuntimeError("gated attention module was called without its gate input hook installed")
        output = gate.gated(_tap(module, "ungated_context", output), attn_gate_input)
    return _tap(module, "context", output.contiguous()), probs


def pass_gate_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: hand the module's input hidden state to the attention function as ``attn_gate_input``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return args, {**kwargs, "attn_gate_input": hidden}


def register_attention_implementation() -> None:
    """Register ``quantizable`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, quantizable_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
