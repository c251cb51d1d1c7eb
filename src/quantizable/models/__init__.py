"""Model families (BERT, OPT, ViT, Llama) with attention specs installed through transformers' extension points."""

from quantizable.models.factory import MODEL_PRESETS, apply_attention_spec, create_model, load_model
from quantizable.models.families import FAMILIES, Family, family_of_config, get_family
from quantizable.models.modeling import QUANTIZABLE_CLASSES, attention_modules, register_auto_classes

__all__ = [
    "FAMILIES",
    "MODEL_PRESETS",
    "QUANTIZABLE_CLASSES",
    "Family",
    "apply_attention_spec",
    "attention_modules",
    "create_model",
    "family_of_config",
    "get_family",
    "load_model",
    "register_auto_classes",
]
