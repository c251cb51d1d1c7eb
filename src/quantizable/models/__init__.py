"""Model families (BERT, OPT, ViT, Llama, GPT-2, Qwen2) with attention specs installed through transformers' extension points."""

from quantizable.models.factory import MODEL_PRESETS, apply_attention_spec, create_model, load_model
from quantizable.models.families import FAMILIES, Family, Task, family_of_config, get_family, is_norm
from quantizable.models.modeling import QUANTIZABLE_CLASSES, attention_modules, register_auto_classes

__all__ = [
    "FAMILIES",
    "MODEL_PRESETS",
    "QUANTIZABLE_CLASSES",
    "Family",
    "Task",
    "apply_attention_spec",
    "attention_modules",
    "create_model",
    "family_of_config",
    "get_family",
    "is_norm",
    "load_model",
    "register_auto_classes",
]

register_auto_classes()  # importing the models registers them: AutoConfig / AutoModelFor* resolve our types
