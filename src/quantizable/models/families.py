"""The model families we support, described by data rather than by copied model code.

Each family names its Hugging Face classes and where its attention modules are; everything else (gates, clipped
softmax, taps for quantization and analysis) is shared through :mod:`quantizable.attention.interface`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.opt.modeling_opt import OPTAttention
from transformers.models.vit.modeling_vit import ViTAttention


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: its classes, task and attention module type."""

    name: str
    task: str  # "mlm", "clm" or "image"
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    attention_class: type[nn.Module]

    @property
    def metric(self) -> str:
        return "accuracy" if self.task == "image" else "perplexity"


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "mlm", BertConfig, BertForMaskedLM, BertSelfAttention),
    "opt": Family("opt", "clm", OPTConfig, OPTForCausalLM, OPTAttention),
    "vit": Family("vit", "image", ViTConfig, ViTForImageClassification, ViTAttention),
    "llama": Family("llama", "clm", LlamaConfig, LlamaForCausalLM, LlamaAttention),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: PreTrainedConfig) -> Family:
    """The family of a (plain or quantizable) config, from its model_type."""
    model_type = config.model_type.removeprefix("quantizable_")
    for family in FAMILIES.values():
        if family.config_class.model_type == model_type:
            return family
    raise ValueError(
        f"unsupported architecture {config.model_type!r}; supported model types: "
        + ", ".join(f.config_class.model_type for f in FAMILIES.values())
    )


def init_std(config: PreTrainedConfig) -> float:
    """The family's weight-init standard deviation (BERT/ViT/Llama ``initializer_range``, OPT ``init_std``)."""
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
