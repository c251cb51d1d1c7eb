"""Quantizable variants of the Hugging Face families: the same modules plus an attention spec.

Each ``Quantizable*`` class is the stock transformers class with one mixin: after the stock ``__init__`` it
installs the spec stored in ``config.attention_spec`` (gates, sink keys/values or value gates on the attention
modules, the ``quantizable`` attention implementation, the optional ViT patch-embedding LayerNorm). The configs get
their own ``model_type`` so that, once ``quantizable`` is imported, ``AutoModelFor*.from_pretrained(run_dir)``
rebuilds them exactly.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from quantizable.attention.gates import AttentionGate
from quantizable.attention.interface import ATTN_IMPLEMENTATION, pass_gate_input, register_attention_implementation
from quantizable.attention.no_op import AttentionSink, ValueGate
from quantizable.attention.spec import AttentionSpec
from quantizable.models.families import attention_geometry, family_of_config, init_std

# Attribute names of the modules a spec adds to each attention module (all new parameters live under them).
ADDED_MODULES = ("attn_gate", "attn_sink", "attn_value_gate")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a model of any supported family, in layer order."""
    family = family_of_config(model.config)
    return [m for m in model.modules() if isinstance(m, family.attention_class)]


def _patch_layernorm_hook(module: nn.Module, args: tuple, output):
    return module.patch_layernorm(output)


class QuantizableMixin:
    """Installs ``config.attention_spec`` on a stock transformers model right after its own ``__init__``."""

    def __init__(self, config, *args, **kwargs) -> None:
        register_attention_implementation()
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config, *args, **kwargs)
        self._install_attention_spec()

    @property
    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec.from_dict(self.config.attention_spec)

    def _install_attention_spec(self) -> None:
        spec = self.attention_spec
        hidden, heads, head_dim = attention_geometry(self.config)
        kv_heads = getattr(self.config, "num_key_value_heads", None) or heads
        std = init_std(self.config)
        for module in attention_modules(self):
            module.attention_spec = spec
            if spec.gated:
                module.attn_gate = AttentionGate(spec, hidden, heads, head_dim, std)
                module.register_forward_pre_hook(pass_gate_input, with_kwargs=True)
            if spec.extra_key:
                module.attn_sink = AttentionSink(spec, kv_heads, head_dim, std)
            if spec.kind == "value_gate":
                module.attn_value_gate = ValueGate(spec, kv_heads, head_dim, std)
        if getattr(self.config, "patch_layernorm", False):
            patch_embeddings = self.vit.embeddings.patch_embeddings
            patch_embeddings.patch_layernorm = nn.LayerNorm(hidden, eps=self.config.layer_norm_eps)
            patch_embeddings.register_forward_hook(_patch_layernorm_hook)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (AttentionGate, AttentionSink, ValueGate)):
            module.reset_parameters(init_std(self.config))


class QuantizableBertConfig(BertConfig):
    model_type = "quantizable_bert"


class QuantizableOPTConfig(OPTConfig):
    model_type = "quantizable_opt"


class QuantizableViTConfig(ViTConfig):
    """ViT config; ``patch_layernorm=True`` adds the LayerNorm after the patch embedding (paper appendix B.4)."""

    model_type = "quantizable_vit"


class QuantizableLlamaConfig(LlamaConfig):
    model_type = "quantizable_llama"


class QuantizableBertForMaskedLM(QuantizableMixin, BertForMaskedLM):
    config_class = QuantizableBertConfig


class QuantizableOPTForCausalLM(QuantizableMixin, OPTForCausalLM):
    config_class = QuantizableOPTConfig


class QuantizableViTForImageClassification(QuantizableMixin, ViTForImageClassification):
    config_class = QuantizableViTConfig


class QuantizableLlamaForCausalLM(QuantizableMixin, LlamaForCausalLM):
    config_class = QuantizableLlamaConfig


QUANTIZABLE_CLASSES = {
    "bert": (QuantizableBertConfig, QuantizableBertForMaskedLM, AutoModelForMaskedLM),
    "opt": (QuantizableOPTConfig, QuantizableOPTForCausalLM, AutoModelForCausalLM),
    "vit": (QuantizableViTConfig, QuantizableViTForImageClassification, AutoModelForImageClassification),
    "llama": (QuantizableLlamaConfig, QuantizableLlamaForCausalLM, AutoModelForCausalLM),
}


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelFor*`` resolve our model types (idempotent)."""
    register_attention_implementation()
    for config_class, model_class, auto_class in QUANTIZABLE_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        auto_class.register(config_class, model_class, exist_ok=True)
