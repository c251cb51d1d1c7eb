"""Attention gates: ``pi = sigmoid(G(x))`` scales each head's output so a head can switch itself off.

x is the attention module's input hidden state (after the pre-attention LayerNorm in pre-LN models). All gate
types keep their weights as plain parameters batched over heads, so a few batched ops evaluate every head's gate;
the linear gate (the default) is one fused node with the multiplication by the output on CPU
(``fused_linear_gate``, a custom op ``quantizable::linear_gate``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from transformers import initialization as init

from quantizable.attention.cpu_kernel import (MAX_GATE_HEADS, kernel_applies, linear_gate_rows,
                                              linear_gate_rows_backward)
from quantizable.attention.spec import AttentionSpec
from quantizable.attention.switch import fast_paths_apply


# The fused linear gate as custom ops (forward, backward): one node for torch.compile and torch.export, as the
# clipped-softmax fast path of attention.fused. Used only where the C kernel applies (CPU, float32); its values are
# those of the ATen ops in ``AttentionGate.gated`` to float rounding, in one sweep over each token's row in forward
# and one in backward instead of ten-odd small dispatched ops; it saves what their graph saves (the output, the
# gate input, the gate probabilities).
@torch.library.custom_op("quantizable::linear_gate", mutates_args=())
def fused_linear_gate(output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output * pi, pi)``, ``pi = sigmoid(bias + per-head x . weight)``, for contiguous float32 CPU tensors."""
    return linear_gate_rows(output, x, weight, bias)


@fused_linear_gate.register_fake
def _(output, x, weight, bias):
    return output.new_empty(output.shape), output.new_empty(output.shape[:-1])


@torch.library.custom_op("quantizable::linear_gate_backward", mutates_args=())
def fused_linear_gate_backward(grad: torch.Tensor, output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(output, x, weight, bias)`` of ``fused_linear_gate`` for the gated output's gradient ``grad``."""
    return linear_gate_rows_backward(grad, output, x, weight, pi)


@fused_linear_gate_backward.register_fake
def _(grad, output, x, weight, pi):
    return (output.new_empty(output.shape), x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[:1]))


def _setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
    gate_output, x, weight, _ = inputs
    pi = output[1]
    ctx.mark_non_differentiable(pi)
    ctx.save_for_backward(gate_output, x, weight, pi)


def _backward(ctx: FunctionCtx, grad: torch.Tensor, _pi: None) -> tuple[torch.Tensor, ...]:
    return fused_linear_gate_backward(grad.contiguous(), *ctx.saved_tensors)


fused_linear_gate.register_autograd(_backward, setup_context=_setup_context)


class AttentionGate(nn.Module):
    """Gate network of one attention layer; ``forward(x)`` returns gate probabilities.

    Output shape is ``(B, T, H, 1)`` for per-head types (one gate per head and token) and ``(B, T, H, d_head)`` for
    ``elementwise`` (one gate per output channel), ready to multiply the ``(B, T, H, d_head)`` attention output.
    """

    def __init__(
        self, spec: AttentionSpec, hidden_size: int, num_heads: int, head_dim: int, init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.gate_type = spec.gate_type
        self.pi_init = spec.pi_init
        self.bias_init = spec.gate_bias_init
        self.num_heads, self.head_dim = num_heads, head_dim
        if self.gate_type in ("linear", "mlp") and hidden_size != num_heads * head_dim:
            raise ValueError(
                f"gate_type={self.gate_type!r} splits the hidden state into per-head slices, which needs "
                f"hidden_size == num_heads * head_dim (got {hidden_size} vs {num_heads} x {head_dim})"
            )
        if self.gate_type == "linear":
            self.weight = nn.Parameter(torch.empty(num_heads, head_dim))
            self.bias = nn.Parameter(torch.empty(num_heads))
        elif self.gate_type == "mlp":
            self.hidden_weight = nn.Parameter(torch.empty(num_heads, head_dim, spec.n_hid))
            self.hidden_bias = nn.Parameter(torch.empty(num_heads, spec.n_hid))
            self.weight = nn.Parameter(torch.empty(num_heads, spec.n_hid))
            self.bias = nn.Parameter(torch.empty(num_heads))
        elif self.gate_type == "all_heads_linear":
            self.weight = nn.Parameter(torch.empty(num_heads, hidden_size))
            self.bias = nn.Parameter(torch.empty(num_heads))
        else:  # elementwise
            self.weight = nn.Parameter(torch.empty(num_heads * head_dim, hidden_size))
            self.bias = nn.Parameter(torch.empty(num_heads * head_dim))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """The family's normal(0, std) weight init; the last bias at ``logit(pi_init)`` for every gate type.

        Uses transformers' init functions, which skip tensors already loaded from a checkpoint.
        """
        init.normal_(self.weight, mean=0.0, std=std)
        init.constant_(self.bias, self.bias_init)
        if self.gate_type == "mlp":
            init.normal_(self.hidden_weight, mean=0.0, std=std)
            init.zeros_(self.hidden_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_type == "linear":
            xh = x.unflatten(-1, (self.num_heads, self.head_dim))
            return ((xh * self.weight).sum(-1) + self.bias).unsqueeze(-1)  # 2x faster than einsum on CPU
        if self.gate_type == "mlp":
            xh = x.unflatten(-1, (self.num_heads, self.head_dim))
            hidden = torch.relu(torch.einsum("bthd,hdn->bthn", xh, self.hidden_weight) + self.hidden_bias)
            return (torch.einsum("bthn,hn->bth", hidden, self.weight) + self.bias).unsqueeze(-1)
        out = nn.functional.linear(x, self.weight, self.bias)
        if self.gate_type == "all_heads_linear":
            return out.unsqueeze(-1)
        return out.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def gated(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention output ``(B, T, H, d_head)`` times the gate of ``x``. The linear gate runs as one fused node
        where the CPU kernel applies; ``fused_attention(False)``, ``use_cpu_kernel(False)`` or torch.compile (unless
        ``compiled_fast_paths(True)``) select the ATen ops."""
        fusable = self.gate_type == "linear" and self.num_heads <= MAX_GATE_HEADS and fast_paths_apply()
        if fusable and kernel_applies(output, x, self.weight):
            gated, _ = fused_linear_gate(output.contiguous(), x.contiguous(), self.weight.contiguous(),
                                         self.bias.contiguous())
            return gated
        return output * self(x).to(output.dtype)

    def extra_repr(self) -> str:
        return f"type={self.gate_type}, heads={self.num_heads}, head_dim={self.head_dim}, pi_init={self.pi_init}"
