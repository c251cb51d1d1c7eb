"""A vanilla run as the stock transformers architecture: the same weights under the family's own ``model_type``
("opt", "bert", "vit", ...), so anyone can load it with plain transformers, without this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Settings of our configs that the stock config does not have or must set itself.
_NOT_STOCK = ("model_type", "architectures", "transformers_version", "attention_spec", "_name_or_path", "auto_map",
              "patch_layernorm")


def _probe(model: Any) -> dict[str, torch.Tensor]:
    """A fixed input for comparing two models' outputs."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    if hasattr(config, "image_size"):
        shape = (2, getattr(config, "num_channels", 1), config.image_size, config.image_size)
        return {"pixel_values": torch.randn(*shape, generator=generator)}
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def export_stock(path: str | Path, out: str | Path) -> Path:
    """Save the vanilla model at ``path`` (a run, a checkpoint directory or a .gguf) with its tokenizer as the stock
    architecture in ``out``; refuses models whose function the stock classes cannot compute (any attention kind but
    vanilla, or the ViT patch LayerNorm), and checks that both give the same logits."""
    from quantizable.data import checkpoint_tokenizer
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config

    model = load_checked_model(path).eval()
    spec = model.attention_spec
    if spec.kind != "vanilla" or getattr(model.config, "patch_layernorm", False):
        what = spec.describe() if spec.kind != "vanilla" else "patch-embedding LayerNorm"
        raise ValueError(f"{path} uses {what}, which the stock transformers architecture does not compute; only "
                         "vanilla models export with --stock")
    family = family_of_config(model.config)
    settings = {key: value for key, value in model.config.to_dict().items() if key not in _NOT_STOCK}
    stock = family.model_class(family.config_class(**settings, attn_implementation="sdpa")).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    probe = _probe(model)
    with torch.no_grad():
        difference = (stock(**probe).logits - model(**probe).logits).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the stock {family.display_name} differs from the run by {difference:.3g} in its logits")
    out = Path(out)
    stock.save_pretrained(out, safe_serialization=True)
    tokenizer = checkpoint_tokenizer(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
