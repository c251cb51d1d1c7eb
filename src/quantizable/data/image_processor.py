"""The image processor saved with an image run: ViT's, plus turning pictures grey first. It imports nothing of
this package, so :mod:`quantizable.remote_code` can copy it beside a model for ``trust_remote_code=True``."""

from __future__ import annotations

from typing import Any

from transformers import ViTImageProcessorPil


class GreyImageProcessor(ViTImageProcessorPil):
    """ViT's image processor that first makes a picture grey (PIL's "L", as training did): the pipeline hands it
    RGB pictures, and a one-channel model cannot take three channels."""

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(image, "convert"):
            image = image.convert("L")
        return super().process_image(image, *args, **kwargs)
