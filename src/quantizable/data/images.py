"""Image data for the ViT family: 28x28 grey images, Fashion-MNIST by default.

Every source is brought to the same form (one channel, 28x28, normalised with Fashion-MNIST's mean and std) so one
model preset serves all of them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from quantizable.data.common import NOT_PREPARED, check_split, load_hf_dataset, looks_like_path, resolve_root

IMAGE_SIZE = 28
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training set, pixel values in [0, 1]
FASHION_MNIST_PREFIX = {"train": "train", "validation": "t10k"}  # its official test set serves as validation
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIR_NAMES = {"train": ("train", "training"), "validation": ("validation", "val", "valid", "test")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims, big-endian uint8 data), gzip-compressed or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ImageArrays(Dataset):
    """uint8 images (N, 28, 28) and integer labels, normalised on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | list[str]):
        if len(images) == 0:
            raise ValueError("the image source holds no images")
        self.images, self.labels, self.classes = images, labels.astype(np.int64), tuple(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = torch.from_numpy(self.images[index].astype(np.float32) / 255.0)
        return {"pixel_values": ((pixels - MEAN) / STD).unsqueeze(0), "labels": int(self.labels[index])}


def _fashion_mnist(split: str, root: Path) -> ImageArrays:
    folder = root / "fashion-mnist"
    prefix = FASHION_MNIST_PREFIX[split]
    images_path, labels_path = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(NOT_PREPARED.format(root=root))
    return ImageArrays(read_idx(images_path), read_idx(labels_path), FASHION_MNIST_CLASSES)


def _to_grey_28(image: Any) -> np.ndarray:
    """A PIL image as a (28, 28) uint8 array."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def _split_dir(path: Path, split: str) -> Path:
    split_dir = next((path / name for name in SPLIT_DIR_NAMES[split] if (path / name).is_dir()), None)
    if split_dir is None:
        if any((path / name).is_dir() for names in SPLIT_DIR_NAMES.values() for name in names):
            raise FileNotFoundError(f"{path} has no {split} directory ({', '.join(SPLIT_DIR_NAMES[split])})")
        split_dir = path
    return split_dir


def _folder_classes(path: Path) -> list[str]:
    """The class names of an image folder: the sub-directories of its training split, sorted."""
    classes = sorted(d.name for d in _split_dir(path, "train").iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{_split_dir(path, 'train')} has no class sub-directories")
    return classes


def _image_folder(path: Path, split: str) -> ImageArrays:
    """ImageFolder layout: ``path/<split>/<class>/*.png`` (train; val, validation or test) or ``path/<class>/``.

    Labels index the training split's classes in both splits, so a class missing from validation does not shift the
    others; a validation class unknown to training is refused."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ValueError("reading an image folder needs Pillow; install it with `pip install pillow`") from error
    split_dir = _split_dir(path, split)
    classes = _folder_classes(path)
    present = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise ValueError(f"{split_dir} has classes the training split lacks: {', '.join(unknown[:5])}")
    images, labels = [], []
    for name in present:
        for file in sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(file) as image:
                images.append(_to_grey_28(image))
            labels.append(classes.index(name))
    if not images:
        raise ValueError(f"no images found in class sub-directories of {split_dir}")
    return ImageArrays(np.stack(images), np.asarray(labels), classes)


def _hf_images(name: str, split: str) -> ImageArrays:
    """A ``datasets`` image classification set with an image column and a label column."""
    try:
        rows = load_hf_dataset(name, None, split)
    except ValueError:
        if split != "validation":
            raise
        rows = load_hf_dataset(name, None, "test")  # most image sets publish a test split only
    image_key = next((k for k in ("image", "img", "pixel_values") if k in rows.column_names), None)
    label_key = next((k for k in ("label", "labels", "fine_label") if k in rows.column_names), None)
    if image_key is None or label_key is None:
        raise ValueError(f"dataset {name!r} needs an image and a label column; it has {rows.column_names}")
    label_feature = rows.features.get(label_key) if rows.features is not None else None
    classes = getattr(label_feature, "names", None) or [str(c) for c in sorted(set(rows[label_key]))]
    images = np.stack([_to_grey_28(image) for image in rows[image_key]])
    return ImageArrays(images, np.asarray(rows[label_key]), classes)


def image_classes(source: str | os.PathLike | None = None) -> list[str]:
    """The class names of an image source, in label order: what a model trained on it predicts (its ``id2label``)."""
    if source is None:
        return list(FASHION_MNIST_CLASSES)
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return _folder_classes(path)
    return list(image_dataset("train", source).classes)


def label_settings(classes: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """A classifier's config for these classes: as many outputs, and their names (``id2label``, what pipelines
    print); a ``model.overrides.num_labels`` that disagrees with the data is refused."""
    if "num_labels" in overrides and overrides["num_labels"] != len(classes):
        raise ValueError(f"model.overrides.num_labels={overrides['num_labels']} but the image data has "
                         f"{len(classes)} classes; leave num_labels out (it follows the data)")
    return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
            "label2id": {name: index for index, name in enumerate(classes)}}


def image_processor(config: Any) -> Any:
    """transformers' image processor for a model with ``config`` trained on this module's images, so that
    ``pipeline("image-classification", model=RUN/model)`` prepares a picture exactly as :class:`ImageArrays` did:
    grey (one-channel models), resized to ``config.image_size`` with bilinear filtering, scaled to [0, 1] and
    normalised with Fashion-MNIST's mean and std."""
    from transformers import ViTImageProcessorPil

    from quantizable.data.image_processor import GreyImageProcessor

    channels = getattr(config, "num_channels", 1)
    kind = GreyImageProcessor if channels == 1 else ViTImageProcessorPil
    return kind(size={"height": config.image_size, "width": config.image_size}, image_mean=[MEAN] * channels,
                image_std=[STD] * channels, do_convert_rgb=channels == 3)


def register_image_processor() -> None:
    """Let ``AutoImageProcessor`` (and so the pipelines) find :class:`GreyImageProcessor` for our ViT (idempotent)."""
    from transformers import AutoImageProcessor

    from quantizable.data.image_processor import GreyImageProcessor
    from quantizable.models import QUANTIZABLE_CLASSES

    AutoImageProcessor.register(QUANTIZABLE_CLASSES["vit"].config_class, slow_image_processor_class=GreyImageProcessor,
                                exist_ok=True)


def image_dataset(split: str, source: str | os.PathLike | None = None, root: str | Path | None = None) -> ImageArrays:
    """``{"pixel_values": (1, 28, 28) float, "labels": int}`` from Fashion-MNIST, an image folder or a datasets name."""
    check_split(split)
    if source is None:
        return _fashion_mnist(split, resolve_root(root))
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _image_folder(path, split)
    if path.exists():
        raise ValueError(f"image source {source} is a file; give a directory of class folders")
    if looks_like_path(source):
        raise FileNotFoundError(f"image source {source} does not exist")
    return _hf_images(source, split)
