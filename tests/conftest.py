import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from quantizable import load_model  # noqa: F401  (a public name registers our model classes and attention)
from quantizable.models import FAMILIES

# One tiny preset per family: every family gets the tests parametrised over these.
TINY_PRESETS = tuple(f"{name}-tiny" for name in FAMILIES)


def tiny_batch(preset: str, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic input batch for a tiny preset (token ids, or 28x28 grey images for ViT)."""
    g = torch.Generator().manual_seed(seed)
    if preset.startswith("vit"):
        return {"pixel_values": torch.randn(batch, 1, 28, 28, generator=g)}
    ids = torch.randint(0, 512, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def default_data() -> None:
    """The embedded corpus and tokenizers, prepared once per session (idempotent: checked by their sha256 sums)."""
    from quantizable.data import prepare_default_data

    prepare_default_data(quiet=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
