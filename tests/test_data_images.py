"""Images at the model's resolution (issue 30): RGB 224 folders, 16-bit / float / palette / RGBA pictures decoded
without corruption, hidden folders ignored, a held-out split that never overlaps training, ImageNet-style
train/ + val/, seeded augmentation, and an RGB ViT run that trains (or fails leaving nothing behind)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from quantizable.data import image_dataset
from quantizable.data.images import decode, image_format, pixels

RGB_224 = SimpleNamespace(image_size=224, num_channels=3)  # what vit-s16's config says


def _folder(root: Path, layout: dict[str, int], size: tuple[int, int] = (50, 40)) -> Path:
    """``root/<split>/<class>/i.png`` (``layout``: class -> pictures per split dir, "" for the flat layout); class
    ``k``'s pictures are pure colour ``k``."""
    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}
    for key, count in layout.items():
        split, _, name = key.rpartition("/")
        directory = root / split / name if split else root / name
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", size, colours[name]).save(directory / f"{index:03d}.png")
    return root


def test_rgb_folder_at_224_with_vit_normalisation(tmp_path):
    folder = _folder(tmp_path, {"train/cat": 2, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    data = image_dataset("validation", folder, config=RGB_224)
    item = data[1]
    assert item["pixel_values"].shape == (3, 224, 224) and item["labels"] == 1 and data.classes == ("cat", "dog")
    red, green, blue = (item["pixel_values"][c].mean().item() for c in range(3))  # (x / 255 - 0.5) / 0.5
    assert abs(green - (200 / 255 - 0.5) / 0.5) < 1e-5 and abs(red - (30 / 255 - 0.5) / 0.5) < 1e-5 and red == blue
    grey = image_dataset("validation", folder)  # no config: the grey 28x28 of the small presets
    assert grey[0]["pixel_values"].shape == (1, 28, 28)


def test_sixteen_bit_float_palette_and_transparent_pictures_decode_right(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")  # Pillow keeps all 16 bits
        decoded = pixels(decode(image, 1), image_format(SimpleNamespace(image_size=4, num_channels=1)))
    unnormalised = decoded[0, 0] * 0.3530 + 0.2860
    assert torch.allclose(unnormalised, torch.tensor([0, 16384, 32768, 65535]) / 65535, atol=1e-5)
    with Image.open(tmp_path / "deep.png") as image:  # the same picture for an RGB model: grey in all channels
        rgb = pixels(decode(image, 3), image_format(SimpleNamespace(image_size=4, num_channels=3)))
    assert torch.allclose(rgb[:, 0] * 0.5 + 0.5, torch.tensor([0, 16384, 32768, 65535]) / 65535, atol=1e-5)
    floats = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32))  # mode F, values in [0, 1]
    assert abs(np.asarray(decode(floats, 1)).mean() - 0.25 * 255) < 1e-3
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(decode(palette, 3))[0, 0].tolist() == [10, 20, 30]
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent: the white background shows
    assert np.asarray(decode(clear, 3))[0, 0].tolist() == [255, 255, 255]


def test_hidden_folders_are_not_classes_or_pictures(tmp_path):
    folder = _folder(tmp_path, {"cat": 4, "dog": 4})
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".ipynb_checkpoints" / "x.png")
    (folder / "cat" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "cat" / ".thumbs" / "y.png")
    train = image_dataset("train", folder)
    assert train.classes == ("cat", "dog") and len(train) + len(image_dataset("validation", folder)) == 8


def test_flat_folder_holds_out_validation_disjoint_and_deterministic(tmp_path):
    folder = _folder(tmp_path, {"cat": 40, "dog": 21, "owl": 1})
    train, validation = image_dataset("train", folder), image_dataset("validation", folder)
    files = lambda data: {data.load(i).filename for i in range(len(data))}  # noqa: E731
    assert files(train).isdisjoint(files(validation)) and len(train) + len(validation) == 62
    assert sorted(set(validation.labels.tolist())) == [0, 1] and len(validation) == 3  # owl's only picture trains
    assert files(validation) == files(image_dataset("validation", folder))


def test_imagenet_style_train_and_val_layout(tmp_path):
    folder = _folder(tmp_path, {"train/cat": 3, "train/dog": 3, "train/owl": 3, "val/dog": 2})
    validation = image_dataset("validation", folder, config=RGB_224)
    assert len(validation) == 2 and validation.labels.tolist() == [1, 1] and len(validation.classes) == 3
    assert len(image_dataset("train", folder, config=RGB_224)) == 9


def test_training_augmentation_is_seeded_by_epoch_and_image(tmp_path):
    folder = tmp_path / "noise" / "train" / "a"
    folder.mkdir(parents=True)
    (tmp_path / "noise" / "val" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for target in (folder / "0.png", tmp_path / "noise" / "val" / "a" / "0.png"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(target)
    config = SimpleNamespace(image_size=32, num_channels=3)
    data = image_dataset("train", tmp_path / "noise", config=config, augment=True, seed=1)
    first = data[0]["pixel_values"]
    assert first.shape == (3, 32, 32) and torch.equal(first, data[0]["pixel_values"])
    data.set_epoch(1)
    assert not torch.equal(first, data[0]["pixel_values"])
    data.set_epoch(0)
    assert torch.equal(first, data[0]["pixel_values"])


def test_rgb_vit_trains_and_a_bad_picture_leaves_nothing(tmp_path):
    from quantizable.training import load_config, train

    folder = _folder(tmp_path / "images", {"train/cat": 4, "train/dog": 4, "val/cat": 1, "val/dog": 1})
    settings = ["run.steps=2", "run.batch_size=4", "run.eval_batches=1", "run.log_every=1", f"data.source={folder}",
                "model.overrides={image_size: 32, patch_size: 8, num_channels: 3, hidden_dropout_prob: 0.0, "
                "attention_probs_dropout_prob: 0.0}"]
    summary = train(load_config("vit-tiny", settings), tmp_path / "run", progress=False)
    assert summary["step"] == 2 and (tmp_path / "run" / "model" / "preprocessor_config.json").is_file()
    (folder / "train" / "cat" / "000.png").write_bytes(b"not a picture")
    with pytest.raises(Exception, match="000.png|identify"):
        train(load_config("vit-tiny", settings), tmp_path / "broken", progress=False)
    assert not (tmp_path / "broken").exists()


def test_loader_workers_give_the_same_batches_and_losses(tmp_path):
    """run.loader_workers decodes and augments in worker processes: the crops depend on (seed, epoch, image) only,
    so the losses equal the single-process run's, across an epoch boundary too (8 pictures, batch 4, 3 steps)."""
    from quantizable.training import load_config, train

    folder = _folder(tmp_path / "images", {"train/cat": 4, "train/dog": 4, "val/cat": 1, "val/dog": 1})
    settings = ["run.steps=3", "run.batch_size=4", "run.eval_batches=1", "run.log_every=1", f"data.source={folder}",
                "model.overrides={image_size: 32, patch_size: 8, num_channels: 3, hidden_dropout_prob: 0.0, "
                "attention_probs_dropout_prob: 0.0}"]
    losses = {}
    for workers in (0, 2):
        run = tmp_path / f"workers{workers}"
        train(load_config("vit-tiny", [*settings, f"run.loader_workers={workers}"]), run, progress=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[workers] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses[0]) == 3 and losses[2] == losses[0]
    with pytest.raises(ValueError, match="loader_workers"):
        load_config("vit-tiny", ["run.loader_workers=-1"])
