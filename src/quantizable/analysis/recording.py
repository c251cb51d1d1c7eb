"""Where the analysed tensors are in a model, and forward hooks that hand them to a callback.

The tensors are found through the family record (:class:`quantizable.models.Family`: block classes and submodule
names, data rather than copied model code) and read through hooks, so stock Hugging Face classes and our
``Quantizable*`` classes are analysed the same way. Attention probabilities come from the ``probs`` tap of
:mod:`quantizable.attention.interface`, which needs the ``quantizable`` attention implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantizable.attention.interface import ATTN_IMPLEMENTATION, register_attention_implementation
from quantizable.models.families import attention_geometry, family_of_config, is_norm

Record = Callable[[int, str, torch.Tensor], None]  # (layer index, tensor name, tensor)


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class Block:
    """One transformer block and the submodules whose tensors are recorded."""

    index: int
    module: nn.Module
    attention: nn.Module
    attention_output: tuple[str, nn.Module]
    ffn_output: tuple[str, nn.Module]
    value: tuple[str, nn.Module]
    norms: list[tuple[str, nn.Module]]


def _submodule(block: nn.Module, name: str) -> tuple[str, nn.Module]:
    try:
        return name, block.get_submodule(name)
    except AttributeError:
        raise ValueError(f"unsupported architecture: no module {name!r} in {type(block).__name__}") from None


def transformer_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a model of any supported family (stock or quantizable), in layer order."""
    family = family_of_config(model.config)
    blocks = []
    for index, (_, module) in enumerate(family.blocks(model)):
        attention = next(m for m in module.modules() if isinstance(m, family.attention_class))
        blocks.append(Block(
            index=index,
            module=module,
            attention=attention,
            attention_output=_submodule(module, family.attention_output),
            ffn_output=_submodule(module, family.ffn_output),
            value=_submodule(module, family.value),
            norms=[(name, sub) for name, sub in module.named_modules() if name and is_norm(sub)],
        ))
    return blocks


@contextmanager
def recording(model: nn.Module, record: Record, with_attention: bool = False) -> Iterator[list[Block]]:
    """Hooks on every block calling ``record(layer, name, tensor)`` for

    ``attn_out`` (attention output projection), ``ffn_out`` (FFN output projection), ``ln_in.<norm>`` (the residual
    sum entering each LayerNorm/RMSNorm of the block), ``block_out`` (the block's output hidden state) and, with
    ``with_attention``, ``probs`` (``(B, H, T, T)`` attention probabilities of the token columns),
    ``value_norm`` (``(B, T, H_kv)`` L2 norms of each head's value vectors, after the value gate of ``value_gate``
    models) and, for gated attention, ``gate`` (``(B, T, H, 1)`` or ``(B, T, H, d_head)`` gate probabilities,
    evaluated once more from the attention module's input by a pre-hook).
    Hooks, taps and the attention implementation are restored on exit.
    """
    blocks = transformer_blocks(model)
    handles = []
    saved_taps: list[tuple[nn.Module, object]] = []
    previous_impl = model.config._attn_implementation

    def output_hook(layer: int, name: str):
        return lambda module, args, output: record(layer, name, _first_output(output))

    def input_hook(layer: int, name: str):
        return lambda module, args: record(layer, name, args[0])

    def probs_tap(layer: int):
        def tap(probs: torch.Tensor) -> torch.Tensor:
            record(layer, "probs", probs)
            return probs
        return tap

    def gate_hook(layer: int):
        def hook(module, args, kwargs):
            record(layer, "gate", module.attn_gate(args[0] if args else kwargs["hidden_states"]))
        return hook

    def gated_value_hook(layer: int):
        return lambda module, args, output: record(layer, "value_norm", output.norm(dim=-1).transpose(1, 2))

    def value_hook(layer: int, head_dim: int, fused_qkv: bool):
        def hook(module, args, output):
            if fused_qkv:  # [q | k | v] along the last axis
                output = output.chunk(3, dim=-1)[2]
            values = output.reshape(*output.shape[:2], -1, head_dim)
            record(layer, "value_norm", values.norm(dim=-1))
        return hook

    try:
        if with_attention and previous_impl != ATTN_IMPLEMENTATION:
            register_attention_implementation()
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        _, _, head_dim = attention_geometry(model.config)
        fused_qkv = family_of_config(model.config).fused_qkv
        for block in blocks:
            i = block.index
            handles.append(block.attention_output[1].register_forward_hook(output_hook(i, "attn_out")))
            handles.append(block.ffn_output[1].register_forward_hook(output_hook(i, "ffn_out")))
            for norm_name, norm in block.norms:
                handles.append(norm.register_forward_pre_hook(input_hook(i, f"ln_in.{norm_name}")))
            handles.append(block.module.register_forward_hook(output_hook(i, "block_out")))
            if with_attention:
                value_gate = getattr(block.attention, "attn_value_gate", None)
                if value_gate is not None:  # the gated values are the ones attention mixes
                    handles.append(value_gate.register_forward_hook(gated_value_hook(i)))
                else:
                    handles.append(block.value[1].register_forward_hook(value_hook(i, head_dim, fused_qkv)))
                if getattr(block.attention, "attn_gate", None) is not None:
                    handles.append(block.attention.register_forward_pre_hook(gate_hook(i), with_kwargs=True))
                taps = getattr(block.attention, "attention_taps", None)
                saved_taps.append((block.attention, taps))
                block.attention.attention_taps = {**(taps or {}), "probs": probs_tap(i)}
        yield blocks
    finally:
        for handle in handles:
            handle.remove()
        for attention, taps in saved_taps:
            attention.attention_taps = taps
        if model.config._attn_implementation != previous_impl:
            model.set_attn_implementation(previous_impl)
