"""Learnable no-op parameters of the comparison mechanisms, installed on attention modules like the gate.

* ``AttentionSink`` (``sink_token``, ``key_bias``): one learnable key per key/value head that every query can
  attend to, with a learnable value (``sink_token``: Sun et al. 2024's attention bias ``softmax(q [K; k'])[V; v']``)
  or an exact zero value (``key_bias``: Gu et al. 2025's key-only bias). Attending to it is the no-op: a head puts
  its probability mass there instead of on a real token.
* ``ValueGate`` (``value_gate``, Bu et al. 2025): every value vector times a sigmoid of itself,
  ``v_j * sigmoid(w_h . v_j + b_h)`` per key/value head, before attention mixes them; a token switches off its own
  contribution, so a head needs no near-zero value ("value-state drain") to do nothing.

* ``SinkLogit`` (``sink_logit``, gpt-oss's attention sinks): one learned logit per query head, appended to every
  softmax row as one more column and dropped after it; softmax+1 with a learned extra logit, no key or value.

All keep their weights as plain parameters batched over heads (no ``nn.Linear``), like ``AttentionGate``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from quantizable.attention.spec import AttentionSpec


class AttentionSink(nn.Module):
    """The extra key (and value) column of one attention layer, ``(num_kv_heads, head_dim)`` each."""

    def __init__(self, spec: AttentionSpec, num_kv_heads: int, head_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.empty(num_kv_heads, head_dim))
        # key_bias: the value is exactly zero, so it is not a parameter
        self.value = nn.Parameter(torch.empty(num_kv_heads, head_dim)) if spec.kind == "sink_token" else None
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """The family's normal(0, std) init (transformers' init functions skip tensors loaded from a checkpoint)."""
        init.normal_(self.key, mean=0.0, std=std)
        if self.value is not None:
            init.normal_(self.value, mean=0.0, std=std)

    def columns(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink key and value as ``(B, H_kv, 1, d_head)`` columns for keys/values shaped like ``like``."""
        batch = like.shape[0]
        key = self.key.to(like.dtype)[None, :, None].expand(batch, -1, 1, -1)
        value = torch.zeros_like(key) if self.value is None else self.value.to(like.dtype)[None, :, None]
        return key, value.expand(batch, -1, 1, -1)

    def extra_repr(self) -> str:
        kind = "key_bias (zero value)" if self.value is None else "sink_token"
        return f"{kind}, kv_heads={self.key.shape[0]}, head_dim={self.key.shape[1]}"


class SinkLogit(nn.Module):
    """The extra softmax column of one attention layer: a logit per query head, ``(num_heads,)``, starting at 0
    (softmax+1), as gpt-oss's sinks; it is query-independent, unlike ``key_bias``'s ``q . k'``."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(num_heads))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.0) -> None:
        """Zero, whatever the family's std (accepted for the same call as the other no-op modules)."""
        init.zeros_(self.logit)

    def column(self) -> torch.Tensor:
        """The logits shaped ``(H, 1, 1)``, to broadcast against ``(B, H, T_q, 1)``."""
        return self.logit[:, None, None]

    def extra_repr(self) -> str:
        return f"heads={self.logit.shape[0]}"


class ValueGate(nn.Module):
    """``v * sigmoid(w_h . v + b_h)`` for value states ``(B, H_kv, T, d_head)``: one gate per head and token."""

    def __init__(self, spec: AttentionSpec, num_kv_heads: int, head_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.bias_init = spec.gate_bias_init
        self.weight = nn.Parameter(torch.empty(num_kv_heads, head_dim))
        self.bias = nn.Parameter(torch.empty(num_kv_heads))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """normal(0, std) weights and the bias at ``logit(pi_init)``, as the attention gate."""
        init.normal_(self.weight, mean=0.0, std=std)
        init.constant_(self.bias, self.bias_init)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        logits = (value * self.weight[:, None]).sum(-1, keepdim=True) + self.bias[:, None, None]
        return value * torch.sigmoid(logits)

    def extra_repr(self) -> str:
        return f"kv_heads={self.weight.shape[0]}, head_dim={self.weight.shape[1]}"
