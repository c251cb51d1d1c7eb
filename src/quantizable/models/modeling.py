"""Quantizable variants of the Hugging Face families: the same modules plus an attention spec.

For each :class:`~quantizable.models.families.Family` there is a ``Quantizable<Config>`` and a
``Quantizable<Model>`` class: the stock transformers classes with one mixin that, after the stock ``__init__``,
installs the spec stored in ``config.attention_spec`` (gates, sink keys/values or value gates on the attention
modules, the ``quantizable`` attention implementation, the optional ViT patch-embedding LayerNorm of paper
appendix B.4, ``config.patch_layernorm``). The classes are made from the family record, so a new family needs no
code here; the configs get their own ``model_type`` so that, once ``quantizable`` is imported,
``AutoModelFor*.from_pretrained(run_dir)`` rebuilds them exactly.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from quantizable.attention.gates import AttentionGate
from quantizable.attention.interface import ATTN_IMPLEMENTATION, pass_gate_input, register_attention_implementation
from quantizable.attention.no_op import AttentionSink, SinkLogit, ValueGate
from quantizable.attention.spec import AttentionSpec
from quantizable.models.families import FAMILIES, Family, attention_geometry, family_of_config, init_std
from quantizable.models.structure import install_structure, reset_structure

# Attribute names of the modules a spec adds to each attention module (all new parameters live under them).
ADDED_MODULES = ("attn_gate", "attn_sink", "attn_value_gate", "attn_sink_logit")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a model of any supported family, in layer order."""
    family = family_of_config(model.config)
    return [m for m in model.modules() if isinstance(m, family.attention_class)]


@torch.no_grad()
def init_query_key(model: nn.Module, how: str) -> None:
    """Re-initialise the query and key projections of every attention module (``attention.spec.QK_INITS``).

    ``lecun`` draws weights from N(0, 1/fan_in) and keeps the biases; ``torch_linear`` redraws weights and biases
    from nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A fused q/k/v projection (GPT-2) gets only its
    query and key output channels redrawn.
    """
    if how == "family":
        return
    family = family_of_config(model.config)
    hidden, heads, head_dim = attention_geometry(model.config)
    for module in attention_modules(model):
        for name in family.query_key:
            layer = module.get_submodule(name)
            axis = family.linear_weight_axis(layer)
            weight = layer.weight.movedim(axis, 0)  # (out, in), a view
            rows = slice(0, 2 * heads * head_dim) if family.fused_qkv else slice(None)
            bound = 1.0 / math.sqrt(weight.shape[1])
            if how == "lecun":
                weight[rows].normal_(0.0, bound)
            else:
                weight[rows].uniform_(-bound, bound)
                if layer.bias is not None:
                    layer.bias[rows].uniform_(-bound, bound)


def scale_clipping(model: nn.Module, fraction: float) -> None:
    """Run clipped softmax with ``fraction`` of the configured gamma (a gamma warm-up step); 1 restores it. Only the
    modules' working spec changes: ``config.attention_spec``, which is saved, keeps the configured value."""
    spec = AttentionSpec.from_dict(model.config.attention_spec).with_gamma_scaled(min(1.0, max(0.0, fraction)))
    for module in attention_modules(model):
        module.attention_spec = spec


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

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs) -> None:
        """Only the ``quantizable`` implementation computes a spec other than vanilla: transformers' own ("eager",
        "sdpa", ...) would silently drop the gates, clipping or sink, so switching to one is refused. (Vanilla is
        the stock softmax, which every implementation computes.)"""
        requested = (attn_implementation.get("", self.config._attn_implementation)
                     if isinstance(attn_implementation, dict) else attn_implementation)
        spec = self.attention_spec
        if requested != ATTN_IMPLEMENTATION and spec.kind != "vanilla":
            raise ValueError(f"attn_implementation={requested!r} would silently drop this model's "
                             f"{spec.describe()}: only {ATTN_IMPLEMENTATION!r} computes it")
        super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' save plus the self-contained modeling code and ``auto_map`` (``quantizable.remote_code``),
        so any saved model, not only a run's, loads with ``trust_remote_code=True`` where quantizable is not
        installed. In such a copy (module named otherwise) transformers' own ``custom_object_save`` does this."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if __name__ == "quantizable.models.modeling" and kwargs.get("is_main_process", True):
            # imported by name, so that the copy made for remote code does not carry the copier
            importlib.import_module("quantizable.remote_code").write_remote_code(save_directory, self)

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
            if spec.kind == "sink_logit":
                module.attn_sink_logit = SinkLogit(heads)
        init_query_key(self, spec.qk_init)  # from_pretrained loads its weights over these afterwards
        family = family_of_config(self.config)
        if family.patch_embedding and getattr(self.config, "patch_layernorm", False):
            patch_embeddings = family.submodule(self, family.patch_embedding)
            patch_embeddings.patch_layernorm = nn.LayerNorm(hidden, eps=self.config.layer_norm_eps)
            patch_embeddings.register_forward_hook(_patch_layernorm_hook)
        install_structure(self, self.config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (AttentionGate, AttentionSink, SinkLogit, ValueGate)):
            module.reset_parameters(init_std(self.config))
        reset_structure(module)


class HeadlessMixin(QuantizableMixin):
    """``AutoModel``'s class for a saved model: the task model's base model as the task model holds it. Our tasks
    (masked LM, image classification, causal LM) build that base without a pooler, so a pooler here would have no
    weights in any checkpoint we write and come up at random on every load."""

    _takes_pooler_flag = False  # the stock class's ``__init__`` has ``add_pooling_layer`` (BERT, ViT)

    def __init__(self, config, *args, **kwargs) -> None:
        if self._takes_pooler_flag and not args:
            kwargs.setdefault("add_pooling_layer", False)
        super().__init__(config, *args, **kwargs)


def _share_weight_conversions(ours: type[PreTrainedModel], stock: type[PreTrainedModel]) -> None:
    """Give our class the checkpoint key renamings transformers keeps for the stock one. transformers looks them up
    by class name, then model type, and ours have neither: without this ``QuantizableViTModel`` would not map the
    saved ``vit.encoder.layer.N.attention.attention.query`` to its ``layers.N.attention.q_proj`` (the task model's
    stock ``ViTModel`` does), and every encoder layer would come up at random."""
    conversions = (get_checkpoint_conversion_mapping(stock.__name__)
                   or get_checkpoint_conversion_mapping(stock.config_class.model_type))
    if conversions is not None:
        register_checkpoint_conversion_mapping(ours.__name__, conversions, overwrite=True)


@dataclass(frozen=True)
class QuantizableClasses:
    """The quantizable config and model class of one family, the ``AutoModelFor*`` class that loads them, and the
    headless model (``AutoModel``: embeddings, ``pipeline("feature-extraction")``)."""

    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    auto_class: type
    base_model_class: type[PreTrainedModel]


def _quantizable_classes(family: Family) -> QuantizableClasses:
    """``Quantizable<Config>`` (model type ``quantizable_<type>``) and ``Quantizable<Model>`` for one family."""
    config_name, model_name = (f"Quantizable{cls.__name__}" for cls in (family.config_class, family.model_class))
    config_class = type(config_name, (family.config_class,), {
        "model_type": f"quantizable_{family.model_type}", "__module__": __name__,
        "__doc__": f"{family.display_name} config with an ``attention_spec``."})
    model_class = type(model_name, (QuantizableMixin, family.model_class), {
        "config_class": config_class, "__module__": __name__,
        "__doc__": f"{family.display_name} with the attention spec of its config installed."})
    base = MODEL_MAPPING[family.config_class]  # transformers' own headless class (BertModel, OPTModel, ...)
    base_name = f"Quantizable{base.__name__}"
    base_model_class = type(base_name, (HeadlessMixin, base), {
        "config_class": config_class, "__module__": __name__,
        "_takes_pooler_flag": "add_pooling_layer" in inspect.signature(base.__init__).parameters,
        "__doc__": f"{family.display_name} without its task head, with the attention spec installed."})
    for ours, stock in ((model_class, family.model_class), (base_model_class, base)):
        _share_weight_conversions(ours, stock)
    for name, cls in ((config_name, config_class), (model_name, model_class), (base_name, base_model_class)):
        globals()[name] = cls  # importable by name
    return QuantizableClasses(config_class, model_class, family.task.auto_class, base_model_class)


QUANTIZABLE_CLASSES: dict[str, QuantizableClasses] = {name: _quantizable_classes(f) for name, f in FAMILIES.items()}


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelFor*`` resolve our model types (idempotent)."""
    register_attention_implementation()
    for classes in QUANTIZABLE_CLASSES.values():
        AutoConfig.register(classes.config_class.model_type, classes.config_class, exist_ok=True)
        classes.auto_class.register(classes.config_class, classes.model_class, exist_ok=True)
        AutoModel.register(classes.config_class, classes.base_model_class, exist_ok=True)
