"""The model families we support: one record per family holds everything a family differs in.

Adding a Hugging Face architecture is one :class:`Family` entry in :data:`FAMILIES` (and presets in
``models/factory.py``): the quantizable model classes (``models/modeling.py``), the analysed tensors
(``analysis/recording.py``), the quantized sites (``quantization/placement.py``), training and evaluation all read
the record. Everything else (gates, clipped softmax, taps) is shared through :mod:`quantizable.attention.interface`.
"""

from __future__ import annotations

from dataclasses import dataclass
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.opt.modeling_opt import OPTAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.vit.modeling_vit import ViTAttention
from transformers.pytorch_utils import Conv1D

from quantizable.tasks import Task


# Layer types with a weight matrix that quantizes like a linear layer, and the axis of its output channels
# (per-channel weight ranges run along it): nn.Linear stores (out, in), GPT-2's Conv1D stores (in, out).
LINEAR_LAYERS: tuple[tuple[type[nn.Module], int], ...] = ((nn.Linear, 0),)


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: classes, task, where its tensors are and how its blocks are wired.

    Submodule names are relative to one transformer block; ``block_class`` is only needed where transformers'
    ``_no_split_modules`` does not name the block (BERT).
    """

    name: str
    display_name: str
    task: Task
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    attention_class: type[nn.Module]
    attention_output: str  # the attention output projection
    ffn_output: str  # the FFN output projection (where the paper localises outliers)
    value: str  # the value projection, or the fused q/k/v projection when ``fused_qkv``
    query_key: tuple[str, ...]  # the query and key projections inside the attention module (the fused one: GPT-2)
    ffn_activation_input: str  # the linear layer whose output the FFN activation reads
    fused_qkv: bool = False  # the value projection's output is [q | k | v] (GPT-2's c_attn)
    pre_ln: bool = True
    pre_ln_flag: str | None = None  # a config field that switches pre-/post-LN (OPT's do_layer_norm_before)
    positions_before_first_block: bool = False  # learnt positions added to the tokens right before block 0
    patch_embedding: str | None = None  # the patch-embedding module (ViT), for the optional patch LayerNorm
    sequence_embeddings: str | None = None  # outputs block 0's input ([CLS] + patches + positions), for registers
    token_type_embeddings: str | None = None  # added to the word embeddings before the positions (BERT)
    flattens_ffn_tokens: bool = False  # the FFN sees (B*T, d) instead of (B, T, d) (OPT)
    linear_layers: tuple[tuple[type[nn.Module], int], ...] = LINEAR_LAYERS
    block_class: type[nn.Module] | None = None

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def is_pre_ln(self, config: PreTrainedConfig) -> bool:
        return bool(getattr(config, self.pre_ln_flag)) if self.pre_ln_flag else self.pre_ln

    def block_names(self) -> tuple[str, ...]:
        """Class names of the transformer block, from transformers' own ``_no_split_modules`` where it has one."""
        if self.block_class is not None:
            return (self.block_class.__name__,)
        return tuple(self.model_class._no_split_modules or ())

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, block)`` of every transformer block, in layer order (stock or quantizable model)."""
        names = self.block_names()
        found = [(name, module) for name, module in model.named_modules()
                 if type(module).__name__ in names and any(isinstance(m, self.attention_class) for m in module.modules())]
        expected = model.config.num_hidden_layers
        if len(found) != expected:
            raise ValueError(f"unsupported architecture {type(model).__name__}: found {len(found)} transformer "
                             f"blocks ({' / '.join(names)}), expected {expected}")
        return found

    def submodule(self, model: nn.Module, name: str) -> nn.Module:
        """The module ``name`` (a path in the task model, like the fields above) of the task model or of its headless
        base model (``AutoModel``), whose paths lack the base model's prefix."""
        if model.base_model is model:
            name = name.removeprefix(f"{model.base_model_prefix}.")
        return model.get_submodule(name)

    def linear_weight_axis(self, module: nn.Module) -> int | None:
        """The output-channel axis of a linear-like layer's weight, or None if ``module`` is not one."""
        for layer_type, axis in self.linear_layers:
            if isinstance(module, layer_type):
                return axis
        return None


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("bert", "BERT", Task.MLM, BertConfig, BertForMaskedLM, BertSelfAttention,
           attention_output="attention.output.dense", ffn_output="output.dense", value="attention.self.value",
           query_key=("query", "key"),
           ffn_activation_input="intermediate.dense", pre_ln=False, block_class=BertLayer,
           token_type_embeddings="bert.embeddings.token_type_embeddings"),
    Family("opt", "OPT", Task.CLM, OPTConfig, OPTForCausalLM, OPTAttention,
           attention_output="self_attn.out_proj", ffn_output="fc2", value="self_attn.v_proj", ffn_activation_input="fc1",
           query_key=("q_proj", "k_proj"),
           pre_ln_flag="do_layer_norm_before", positions_before_first_block=True, flattens_ffn_tokens=True),
    Family("vit", "ViT", Task.IMAGE, ViTConfig, ViTForImageClassification, ViTAttention,
           attention_output="attention.o_proj", ffn_output="mlp.fc2", value="attention.v_proj",
           query_key=("q_proj", "k_proj"),
           ffn_activation_input="mlp.fc1",
           positions_before_first_block=True, patch_embedding="vit.embeddings.patch_embeddings",
           sequence_embeddings="vit.embeddings"),
    Family("llama", "Llama", Task.CLM, LlamaConfig, LlamaForCausalLM, LlamaAttention,
           attention_output="self_attn.o_proj", ffn_output="mlp.down_proj", value="self_attn.v_proj",
           query_key=("q_proj", "k_proj"),
           ffn_activation_input="mlp.gate_proj"),
    Family("gpt2", "GPT-2", Task.CLM, GPT2Config, GPT2LMHeadModel, GPT2Attention,
           attention_output="attn.c_proj", ffn_output="mlp.c_proj", value="attn.c_attn", fused_qkv=True,
           query_key=("c_attn",),
           ffn_activation_input="mlp.c_fc",
           positions_before_first_block=True, linear_layers=((nn.Linear, 0), (Conv1D, 1))),
    Family("qwen2", "Qwen2", Task.CLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Attention,
           attention_output="self_attn.o_proj", ffn_output="mlp.down_proj", value="self_attn.v_proj",
           query_key=("q_proj", "k_proj"),
           ffn_activation_input="mlp.gate_proj"),
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: PreTrainedConfig) -> Family:
    """The family of a (plain or quantizable) config, from its model_type."""
    model_type = config.model_type.removeprefix("quantizable_")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise ValueError(
        f"unsupported architecture {config.model_type!r}; supported model types: "
        + ", ".join(f.model_type for f in FAMILIES.values())
    )


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm of any family (transformers names its RMSNorms ``<Family>RMSNorm``), or the
    ``SingleScaleNorm`` that replaces them (``models.structure``)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm", "SingleScaleNorm"))


def init_std(config: PreTrainedConfig) -> float:
    """The family's weight-init standard deviation (``initializer_range``; OPT calls it ``init_std``)."""
    for attr in ("initializer_range", "init_std"):
        value = getattr(config, attr, None)
        if value:
            return float(value)
    return 0.02


def attention_geometry(config: PreTrainedConfig) -> tuple[int, int, int]:
    """``(hidden_size, num_heads, head_dim)`` of the attention layers."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden and getattr(config, "head_dim", None) is None:
        raise ValueError(
            f"num_attention_heads ({heads}) must divide hidden_size ({hidden}); allowed: any divisor of hidden_size"
        )
    return hidden, heads, head_dim
