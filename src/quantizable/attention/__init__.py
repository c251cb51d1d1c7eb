"""Attention variants: clipped softmax, gated attention, the comparison no-op mechanisms and the attention function
that hosts them all."""

from quantizable.attention.cpu_kernel import use_cpu_kernel
from quantizable.attention.gates import AttentionGate
from quantizable.attention.interface import (ATTN_IMPLEMENTATION, TAP_NAMES, fused_attention,
                                             register_attention_implementation)
from quantizable.attention.no_op import AttentionSink, SinkLogit, ValueGate
from quantizable.attention.softmax import (clipped_softmax, gamma_from_alpha, sigmoid_attention, softmax_plus_one,
                                           softmax_with_sink, softpick)
from quantizable.attention.spec import GATE_TYPES, KINDS, QK_INITS, AttentionSpec, spec_for_method

__all__ = [
    "ATTN_IMPLEMENTATION",
    "GATE_TYPES",
    "KINDS",
    "QK_INITS",
    "TAP_NAMES",
    "AttentionGate",
    "AttentionSink",
    "AttentionSpec",
    "clipped_softmax",
    "fused_attention",
    "gamma_from_alpha",
    "register_attention_implementation",
    "sigmoid_attention",
    "SinkLogit",
    "softmax_plus_one",
    "softmax_with_sink",
    "softpick",
    "spec_for_method",
    "use_cpu_kernel",
    "ValueGate",
]
