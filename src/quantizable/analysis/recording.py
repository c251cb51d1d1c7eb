"""Where the analysed tensors are in a model, and forward hooks that hand them to a callback.

The tensors are found by submodule names (data, not copied model code) and read through hooks, so stock Hugging
Face classes and our ``Quantizable*`` classes are analysed the same way. Attention probabilities come from the
``probs`` tap of :mod:`quantizable.attention.interface`, which needs the ``quantizable`` attention implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantizable.attention.interface import ATTN_IMPLEMENTATION, register_attention_implementation
from quantizable.models.families import attention_geometry
from quantizable.models.modeling import attention_modules

# Submodule names inside one transformer block, first match wins (BERT, OPT, ViT, Llama in transformers 5).
ATTENTION_OUTPUT_NAMES = ("attention.output.dense", "self_attn.out_proj", "self_attn.o_proj", "attention.o_proj")
FFN_OUTPUT_NAMES = ("output.dense", "fc2", "mlp.fc2", "mlp.down_proj")
VALUE_NAMES = ("attention.self.value", "self_attn.v_proj", "attention.v_proj")

Record = Callable[[int, str, torch.Tensor], None]  # (layer index, tensor name, tensor)


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _named(block: nn.Module, candidates: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    for name in candidates:
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(f"unsupported architecture: no {what} module ({' / '.join(candidates)}) in {type(block).__name__}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


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


def transformer_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a BERT/OPT/ViT/Llama model (stock or quantizable), in layer order."""
    n_layers = model.config.num_hidden_layers
    layer_lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    attentions = attention_modules(model)
    if not layer_lists or len(attentions) != n_layers:
        raise ValueError(f"unsupported architecture {type(model).__name__}: cannot find its {n_layers} transformer blocks")
    blocks = []
    for index, (module, attention) in enumerate(zip(layer_lists[0], attentions)):
        if not any(sub is attention for sub in module.modules()):
            raise ValueError(f"unsupported architecture {type(model).__name__}: attention {index} is not in block {index}")
        norms = [(name, sub) for name, sub in module.named_modules() if name and _is_norm(sub)]
        blocks.append(Block(
            index=index,
            module=module,
            attention=attention,
            attention_output=_named(module, ATTENTION_OUTPUT_NAMES, "attention output projection"),
            ffn_output=_named(module, FFN_OUTPUT_NAMES, "FFN output projection"),
            value=_named(module, VALUE_NAMES, "value projection"),
            norms=norms,
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

    def value_hook(layer: int, head_dim: int):
        def hook(module, args, output):
            values = output.reshape(*output.shape[:2], -1, head_dim)
            record(layer, "value_norm", values.norm(dim=-1))
        return hook

    try:
        if with_attention and previous_impl != ATTN_IMPLEMENTATION:
            register_attention_implementation()
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        _, _, head_dim = attention_geometry(model.config)
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
                    handles.append(block.value[1].register_forward_hook(value_hook(i, head_dim)))
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
