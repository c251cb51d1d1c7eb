"""The image processor saved with an image run, so ``pipeline("image-classification", model=RUN/model)`` prepares
an image exactly as training did (:class:`quantizable.data.images.ImageArrays`): grey, resized to the model's image
size with bilinear filtering, scaled to [0, 1] and normalised with Fashion-MNIST's mean and std."""

from __future__ import annotations

from typing import Any

from transformers import AutoImageProcessor, ViTImageProcessorPil

from quantizable.data.images import MEAN, STD


class GreyImageProcessor(ViTImageProcessorPil):
    """ViT's image processor that first makes a picture grey (PIL's "L", as training did): the pipeline hands it
    RGB pictures, and a one-channel model cannot take three channels."""

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(image, "convert"):
            image = image.convert("L")
        return super().process_image(image, *args, **kwargs)


def image_processor(config: Any) -> ViTImageProcessorPil:
    """The processor for a model with ``config`` (its ``image_size`` and ``num_channels``)."""
    channels = getattr(config, "num_channels", 1)
    kind = GreyImageProcessor if channels == 1 else ViTImageProcessorPil
    return kind(size={"height": config.image_size, "width": config.image_size}, image_mean=[MEAN] * channels,
                image_std=[STD] * channels, do_convert_rgb=channels == 3)


def register_image_processor() -> None:
    """Let ``AutoImageProcessor`` (and so the pipelines) find :class:`GreyImageProcessor` for our ViT (idempotent)."""
    from quantizable.models import QUANTIZABLE_CLASSES

    AutoImageProcessor.register(QUANTIZABLE_CLASSES["vit"].config_class, slow_image_processor_class=GreyImageProcessor,
                                exist_ok=True)
