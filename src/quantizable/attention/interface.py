"""One attention function for every Hugging Face family, registered through ``AttentionInterface``.

Hugging Face attention modules (BERT, OPT, ViT, Llama, ...) project q/k/v themselves and then call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)``. Registering ``quantizable``
there lets us change only the part between the projections and the output projection, for all families at once:

* softmax on fused SDPA (vanilla), or materialised probabilities for clipped softmax / softmax+1; clipped softmax
  takes the single-node fast path of ``attention.fused`` unless taps need the intermediates or
  ``fused_attention(False)`` selects the reference ops;
* an optional per-head gate on the attention output, computed from the module's input hidden state, which a
  forward pre-hook passes down as the keyword ``attn_gate_input`` (the linear gate is one fused node on CPU);
* named *taps* (``scores``, ``probs``, ``context``) where quantizers and analysis hooks observe or replace the
  internal tensors; a module with taps on ``scores``/``probs`` takes the materialised path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from quantizable.attention.fused import clipped_softmax_attention
from quantizable.attention.softmax import clipped_softmax, softmax_plus_one
from quantizable.attention.spec import AttentionSpec
from quantizable.attention.switch import fused_attention

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


def normalise(scores: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Turn masked, scaled scores into attention probabilities according to the spec."""
    if spec.kind == "clipped_softmax":
        return clipped_softmax(scores, spec.resolved_gamma(), spec.zeta)
    if spec.kind == "softmax_plus_one":
        return softmax_plus_one(scores)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


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
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    scores = _tap(module, "scores", torch.matmul(query, key.transpose(2, 3)) * scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _tap(module, "probs", normalise(scores, spec))
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(dropped, value), probs


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
    if spec.needs_probabilities or observed:
        fast = fused_attention.enabled and spec.kind == "clipped_softmax" and not observed
        context, probs = _materialised_attention(
            module, query, key, value, attention_mask, scaling, dropout, causal, fast
        )
        output = context.transpose(1, 2)
    else:
        output, probs = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    gate = getattr(module, "attn_gate", None)
    if gate is not None:
        if attn_gate_input is None:
            raise RuntimeError("gated attention module was called without its gate input hook installed")
        output = gate.gated(output, attn_gate_input)
    return _tap(module, "context", output.contiguous()), probs


def pass_gate_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: hand the module's input hidden state to the attention function as ``attn_gate_input``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return args, {**kwargs, "attn_gate_input": hidden}


def register_attention_implementation() -> None:
    """Register ``quantizable`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, quantizable_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
