"""quantizable: train transformers that quantize to full INT8 (clipped softmax and gated attention).

The public names are imported on first use, so that the ``quantizable`` command answers ``--help`` without
waiting for torch and transformers. Importing any of them also registers our model classes with transformers'
``Auto*`` classes and our image processor with ``AutoImageProcessor`` (e.g. ``from quantizable import
load_model``), so transformers' pipelines load saved runs.
"""

import importlib
import logging
from typing import Any

# transformers imports torchao, whose CPU wheel logs about GPU-only kernels and deprecated enum registrations.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

__version__ = "0.1.0"
_PUBLIC = {"AttentionSpec": "quantizable.attention", "clipped_softmax": "quantizable.attention",
           "apply_attention_spec": "quantizable.models", "create_model": "quantizable.models",
           "load_model": "quantizable.models"}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'quantizable' has no attribute {name!r}")
    from quantizable.data.images import register_image_processor
    from quantizable.models import register_auto_classes

    register_auto_classes()
    register_image_processor()
    return getattr(importlib.import_module(_PUBLIC[name]), name)
