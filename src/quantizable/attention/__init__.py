"""Attention variants: clipped softmax, gated attention and the attention function that hosts them."""

from quantizable.attention.gates import AttentionGate
from quantizable.attention.interface import ATTN_IMPLEMENTATION, TAP_NAMES, register_attention_implementation
from quantizable.attention.softmax import clipped_softmax, gamma_from_alpha, softmax_plus_one
from quantizable.attention.spec import GATE_TYPES, KINDS, AttentionSpec, spec_for_method

__all__ = [
    "ATTN_IMPLEMENTATION",
    "GATE_TYPES",
    "KINDS",
    "TAP_NAMES",
    "AttentionGate",
    "AttentionSpec",
    "clipped_softmax",
    "gamma_from_alpha",
    "register_attention_implementation",
    "softmax_plus_one",
    "spec_for_method",
]
