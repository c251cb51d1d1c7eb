"""Image data for the ViT family: Fashion-MNIST by default, image folders (ImageNet-style ``train/`` + ``val/``, or
class folders with a held-out split) and ``datasets`` image sets, at the model's own ``image_size`` and
``num_channels``.

Pictures are decoded properly whatever their storage (16-bit and float grey, palette, transparency, CMYK), read
lazily (ImageNet does not fit in memory), resized with PIL's bilinear filter as transformers' ViT image processor
does and normalised with its mean and std (grey models: Fashion-MNIST's), so the saved processor prepares a picture
exactly as validation did. Training on a folder or hub set adds the paper's RandomResizedCrop and horizontal flip
(implemented here with PIL: torchvision is not a dependency); RandAugment, Mixup and CutMix are not reproduced.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from quantizable.data.common import (NOT_PREPARED, check_split, load_hf_dataset, looks_like_path, resolve_root,
                                     split_documents)

IMAGE_SIZE = 28
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training set, pixel values in [0, 1]
RGB_MEAN, RGB_STD = 0.5, 0.5  # transformers' ViTImageProcessor defaults (IMAGENET_STANDARD_MEAN / _STD)
FASHION_MNIST_PREFIX = {"train": "train", "validation": "t10k"}  # its official test set serves as validation
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIR_NAMES = {"train": ("train", "training"), "validation": ("validation", "val", "valid", "test")}
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults, as in DeiT / the paper's ViT
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # Pillow's modes for 16-bit grey (PNG, TIFF)


@dataclass(frozen=True)
class ImageFormat:
    """What a model takes: ``size`` x ``size`` pixels, 1 (grey) or 3 (RGB) channels, and the normalisation."""

    size: int = IMAGE_SIZE
    channels: int = 1
    mean: float = MEAN
    std: float = STD

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"images have 1 (grey) or 3 (RGB) channels; the model config says {self.channels}")
        if self.size < 1:
            raise ValueError(f"image_size must be positive, got {self.size}")


def image_format(config: Any = None) -> ImageFormat:
    """The format of a model config's ``image_size`` and ``num_channels`` (none: grey 28x28, Fashion-MNIST's)."""
    if config is None:
        return ImageFormat()
    channels = getattr(config, "num_channels", 1)
    if channels == 3:
        return ImageFormat(config.image_size, 3, RGB_MEAN, RGB_STD)
    return ImageFormat(config.image_size, channels)


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


def decode(image: Any, channels: int) -> Any:
    """A PIL image as 8-bit "L" or "RGB", or as "F" (grey in [0, 255], full precision) for 16-bit and float
    pictures, which ``convert`` would clip to white; transparency is composited on white, palettes expanded."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) * np.float32(255 / 65535)
        return Image.fromarray(np.clip(values, 0, 255))
    if image.mode == "F":  # float pictures store [0, 1] (or, rarely, [0, 255])
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        return Image.fromarray(np.clip(values * (255 if values.size and values.max() <= 1 else 1), 0, 255))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def pixels(image: Any, form: ImageFormat) -> torch.Tensor:
    """A decoded image as the model's normalised (channels, size, size) float32 tensor."""
    from PIL import Image

    if image.size != (form.size, form.size):
        image = image.resize((form.size, form.size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape[0] != form.channels:  # a 16-bit grey picture for an RGB model
        array = np.repeat(array, form.channels, axis=0)
    return (torch.from_numpy(np.ascontiguousarray(array)) - form.mean) / form.std


def random_resized_crop(image: Any, size: int, rng: np.random.Generator) -> Any:
    """RandomResizedCrop (8-100 % of the area, aspect 3/4-4/3, else the centre) and a horizontal flip half the
    time, resized to ``size`` x ``size``."""
    from PIL import Image

    width, height = image.size
    box = None
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        w = min(width, round(height * CROP_RATIO[1]))
        h = min(height, round(width / CROP_RATIO[0]))
        box = ((width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


class ImageSet(Dataset):
    """Images read on access (``load(index)`` gives a PIL image) with integer labels: ``{"pixel_values", "labels"}``.

    With ``augment`` each access crops and flips at random; the draw depends only on (seed, epoch, index), so a
    resumed run sees the same pictures (the trainer calls :meth:`set_epoch` as a DistributedSampler is told)."""

    def __init__(self, load: Callable[[int], Any], labels: np.ndarray, classes: tuple[str, ...] | list[str],
                 form: ImageFormat, augment: bool = False, seed: int = 0):
        if len(labels) == 0:
            raise ValueError("the image source holds no images")
        self.load, self.labels, self.classes = load, np.asarray(labels, dtype=np.int64), tuple(classes)
        self.form, self.augment, self.seed, self.epoch = form, augment, seed, 0
        decode(load(0), form.channels)  # an unreadable source fails now, before a training run writes anything

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = decode(self.load(index), self.form.channels)
        if self.augment:
            image = random_resized_crop(image, self.form.size, np.random.default_rng([self.seed, self.epoch, index]))
        return {"pixel_values": pixels(image, self.form), "labels": int(self.labels[index])}


def _fashion_mnist(split: str, root: Path, form: ImageFormat) -> ImageSet:
    from PIL import Image

    folder = root / "fashion-mnist"
    prefix = FASHION_MNIST_PREFIX[split]
    images_path, labels_path = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(NOT_PREPARED.format(root=root))
    images = read_idx(images_path)
    return ImageSet(lambda index: Image.fromarray(images[index]), read_idx(labels_path), FASHION_MNIST_CLASSES, form)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")  # .ipynb_checkpoints, .DS_Store, .git: never a class or a picture


def _split_dir(path: Path, split: str) -> Path | None:
    """The split's own directory; ``None`` for a flat layout (class folders only), which holds out validation."""
    split_dir = next((path / name for name in SPLIT_DIR_NAMES[split] if (path / name).is_dir()), None)
    if split_dir is None and any((path / name).is_dir() for names in SPLIT_DIR_NAMES.values() for name in names):
        raise FileNotFoundError(f"{path} has no {split} directory ({', '.join(SPLIT_DIR_NAMES[split])})")
    return split_dir


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and _visible(d))


def _folder_classes(path: Path) -> list[str]:
    """The class names of an image folder: the sub-directories of its training split, sorted."""
    train = _split_dir(path, "train") or path
    classes = [d.name for d in _class_dirs(train)]
    if not classes:
        raise ValueError(f"{train} has no class sub-directories")
    return classes


def _pictures(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _image_folder(path: Path, split: str, form: ImageFormat, augment: bool, seed: int) -> ImageSet:
    """ImageFolder layout: ``path/<split>/<class>/*`` (train; val, validation or test), or ``path/<class>/`` whose
    pictures are split 95 / 5 per class (spread evenly, deterministic), so validation never sees training images.

    Labels index the training split's classes in both splits, so a class missing from validation does not shift the
    others; a validation class unknown to training is refused."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ValueError("reading an image folder needs Pillow; install it with `pip install pillow`") from error
    split_dir = _split_dir(path, split)
    classes = _folder_classes(path)
    present = _class_dirs(split_dir or path)
    unknown = [d.name for d in present if d.name not in classes]
    if unknown:
        raise ValueError(f"{split_dir} has classes the training split lacks: {', '.join(unknown[:5])}")
    files, labels = [], []
    for directory in present:
        chosen = _pictures(directory)
        chosen = chosen if split_dir is not None else split_documents(chosen, split)
        files += chosen
        labels += [classes.index(directory.name)] * len(chosen)
    if not files:
        raise ValueError(f"no images found in class sub-directories of {split_dir or path}"
                         + ("" if split_dir else f" for the {split} split (5 % of each class's pictures, at least "
                                                 "one of a class with two)"))

    def load(index: int) -> Any:
        with Image.open(files[index]) as image:
            image.load()
            return image

    return ImageSet(load, np.asarray(labels), classes, form, augment, seed)


def _hf_images(name: str, split: str, form: ImageFormat, augment: bool, seed: int) -> ImageSet:
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
    return ImageSet(lambda index: rows[index][image_key], np.asarray(rows[label_key]), classes, form, augment, seed)


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
    ``pipeline("image-classification", model=RUN/model)`` prepares a picture exactly as validation did:
    grey or RGB, resized to ``config.image_size`` with bilinear filtering, scaled to [0, 1] and normalised
    (:func:`image_format`)."""
    from transformers import ViTImageProcessorPil

    from quantizable.data.image_processor import GreyImageProcessor

    form = image_format(config)
    kind = GreyImageProcessor if form.channels == 1 else ViTImageProcessorPil
    return kind(size={"height": form.size, "width": form.size}, image_mean=[form.mean] * form.channels,
                image_std=[form.std] * form.channels, do_convert_rgb=form.channels == 3)


def register_image_processor() -> None:
    """Let ``AutoImageProcessor`` (and so the pipelines) find :class:`GreyImageProcessor` for our ViT (idempotent)."""
    from transformers import AutoImageProcessor

    from quantizable.data.image_processor import GreyImageProcessor
    from quantizable.models import QUANTIZABLE_CLASSES

    AutoImageProcessor.register(QUANTIZABLE_CLASSES["vit"].config_class, slow_image_processor_class=GreyImageProcessor,
                                exist_ok=True)


def image_dataset(split: str, source: str | os.PathLike | None = None, root: str | Path | None = None,
                  config: Any = None, augment: bool = False, seed: int = 0) -> ImageSet:
    """``{"pixel_values": (channels, size, size) float, "labels": int}`` for a model with ``config`` (default: grey
    28x28) from Fashion-MNIST, an image folder or a datasets name; ``augment`` (training on a folder or hub set):
    random resized crops and flips."""
    check_split(split)
    form = image_format(config)
    if source is None:
        return _fashion_mnist(split, resolve_root(root), form)
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _image_folder(path, split, form, augment, seed)
    if path.exists():
        raise ValueError(f"image source {source} is a file; give a directory of class folders")
    if looks_like_path(source):
        raise FileNotFoundError(f"image source {source} does not exist")
    return _hf_images(source, split, form, augment, seed)
