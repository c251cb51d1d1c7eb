"""Build, convert and load models: ``create_model``, ``apply_attention_spec``, ``load_model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from quantizable.attention.spec import AttentionSpec
from quantizable.models.families import attention_geometry, family_of_config
from quantizable.models.modeling import ADDED_MODULES, QUANTIZABLE_CLASSES, register_auto_classes

# Named architectures (family, config overrides). Paper-scale presets follow the paper's appendix C;
# "tiny" ones are for tests, "small" ones for CPU training.
MODEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-tiny": ("bert", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128)),
    "bert-small": ("bert", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                                intermediate_size=512, max_position_embeddings=128)),
    "bert-6l": ("bert", dict(num_hidden_layers=6, max_position_embeddings=256)),
    "bert-base": ("bert", dict(max_position_embeddings=512)),
    "opt-tiny": ("opt", dict(vocab_size=512, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, ffn_dim=128, max_position_embeddings=128, init_std=0.02)),
    "opt-small": ("opt", dict(hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=6, num_attention_heads=8,
                              ffn_dim=512, max_position_embeddings=128, init_std=0.02)),
    "opt-125m": ("opt", dict(hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12, num_attention_heads=12,
                             ffn_dim=3072, max_position_embeddings=512, init_std=0.006)),
    "vit-tiny": ("vit", dict(image_size=28, patch_size=7, num_channels=1, num_labels=10, hidden_size=64,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
    "vit-small": ("vit", dict(image_size=28, patch_size=4, num_channels=1, num_labels=10, hidden_size=128,
                              num_hidden_layers=4, num_attention_heads=8, intermediate_size=512)),
    "vit-s16": ("vit", dict(image_size=224, patch_size=16, num_channels=3, num_labels=1000, hidden_size=384,
                            num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                            patch_layernorm=True)),
    # the Bigram-Backcopy task (data.source=backcopy): pre-LN, one head per layer as in Guo et al. 2024
    "opt-backcopy": ("opt", dict(hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=2, num_attention_heads=1,
                                 ffn_dim=512, max_position_embeddings=128, init_std=0.02)),
    "llama-tiny": ("llama", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)),
    # GPT-2's own <|endoftext|> id (50256) is outside small vocabularies: <s> / </s> of the embedded BPE tokenizer
    "gpt2-tiny": ("gpt2", dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128,
                               bos_token_id=0, eos_token_id=1)),
    "gpt2-small": ("gpt2", dict(n_embd=128, n_layer=6, n_head=8, n_inner=512, n_positions=128,
                                bos_token_id=0, eos_token_id=1)),
    "qwen2-tiny": ("qwen2", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)),
}


def create_model(
    preset: str,
    spec: AttentionSpec | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A freshly initialised quantizable model from a preset name (``bert-tiny``, ``opt-125m``, ...) or a family
    name (``bert``, ``opt``, ``gpt2``, ...: the transformers defaults), with the given attention spec."""
    if preset in MODEL_PRESETS:
        family_name, base = MODEL_PRESETS[preset]
    elif preset in QUANTIZABLE_CLASSES:
        family_name, base = preset, {}
    else:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join([*MODEL_PRESETS, *QUANTIZABLE_CLASSES])}")
    register_auto_classes()
    classes = QUANTIZABLE_CLASSES[family_name]
    spec = spec or AttentionSpec()
    config = classes.config_class(**{**base, **config_overrides}, attention_spec=spec.to_dict())
    attention_geometry(config)
    return classes.model_class(config)


_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "attention_spec", "_name_or_path")


def apply_attention_spec(model: PreTrainedModel, spec: AttentionSpec) -> PreTrainedModel:
    """A quantizable copy of ``model`` (any supported family) with ``spec`` applied.

    Every pretrained weight is kept bit-identical; only the spec's new parameters (gates, sink keys/values, value
    gates) are initialised (with the family's init and ``logit(pi_init)`` biases). Returns a new model on the same
    device and dtype; ``model`` is untouched.
    """
    family = family_of_config(model.config)
    register_auto_classes()
    classes = QUANTIZABLE_CLASSES[family.name]
    settings = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
    config = classes.config_class(**settings, attention_spec=spec.to_dict())
    reference = next(model.parameters())
    new_model = classes.model_class(config).to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = new_model.load_state_dict(model.state_dict(), strict=False)
    not_added = [k for k in [*missing, *unexpected] if not any(f".{name}." in k for name in ADDED_MODULES)]
    if not_added:
        raise ValueError(f"state dict mismatch beyond the spec's added parameters: {not_added[:5]}")
    new_model.train(model.training)
    return new_model


def _resolve_checkpoint(path: Path) -> tuple[Path, str | None]:
    """A checkpoint directory (or run directory holding ``model/``) and an optional GGUF file name in it."""
    if not path.exists():
        raise FileNotFoundError(f"no such model or run directory: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, _complete_gguf(path).name
        raise ValueError(f"{path} is a file, not a checkpoint directory or a .gguf file")
    for directory in (path / "model", path):
        if (directory / "config.json").is_file():
            if not any(directory.glob("*.safetensors")) and any(directory.glob("pytorch_model*.bin")):
                raise ValueError(f"{directory} holds only pytorch_model.bin, a pickle, and quantizable never loads "
                                 f"pickles (loading one can run code); convert it once where you trust it: "
                                 f"AutoModel.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors")
            return directory, None
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return path, _complete_gguf(ggufs[0]).name
    raise ValueError(f"{path} is not a checkpoint: no config.json, model/config.json or .gguf file in it")


def _complete_gguf(path: Path) -> Path:
    """``path`` once ``gguf``'s reader (the one transformers uses) has parsed its header and mapped every tensor: a
    truncated file fails there with a ``struct`` or reshape error that says nothing about the file."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as error:  # noqa: BLE001  (any parse failure of this file means the same to the user)
        raise ValueError(f"{path} is not a complete GGUF file (truncated or damaged: {type(error).__name__}: "
                         f"{error}); download it again") from None
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, new_weights: bool = False) -> PreTrainedModel:
    """Load one of our run directories, a Hugging Face checkpoint directory of a supported family, or a GGUF file.

    Stock checkpoints load into the family's task class (BERT: masked LM, OPT/Llama/GPT-2/Qwen2: causal LM,
    ViT: classification); loading goes through safetensors (or GGUF), never pickle. A checkpoint without the task
    head (e.g. a sentence-transformers encoder) would get that head initialised at random on every load, so its
    scores would be random too: that is refused unless ``new_weights`` (fine-tuning, which trains the new head).
    """
    register_auto_classes()
    directory, gguf_file = _resolve_checkpoint(Path(path))
    if gguf_file:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
        family_of_config(model.config)
        return model.eval()
    config = AutoConfig.from_pretrained(directory)
    family = family_of_config(config)
    if config.model_type.startswith("quantizable_"):
        model_class = QUANTIZABLE_CLASSES[family.name].model_class
    else:
        model_class = family.model_class
    model, info = model_class.from_pretrained(directory, dtype=dtype, use_safetensors=True, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing and not new_weights:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{path} has no weights for {len(missing)} tensor(s) of {model_class.__name__} ({shown}): "
                         f"they would be initialised at random on every load and every score would be random; it "
                         f"is probably a base model without the {family.name} task head. Fine-tune it first "
                         f"(quantizable train --init-from {path} trains the head), or score an encoder's "
                         f"embeddings (benchmarks/ptq_baselines.py --embedding-fidelity)")
    return model.eval()
