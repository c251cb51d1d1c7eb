"""quantizable: train transformers that quantize to full INT8 (clipped softmax and gated attention)."""

import logging

# transformers imports torchao, whose CPU wheel logs about GPU-only kernels and deprecated enum registrations.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from quantizable.attention import AttentionSpec, clipped_softmax
from quantizable.models import apply_attention_spec, create_model, load_model, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"
__all__ = ["AttentionSpec", "apply_attention_spec", "clipped_softmax", "create_model", "load_model"]
