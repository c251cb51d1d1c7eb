"""Shared pieces of the data layer: where the default data lives, the document split, the DataLoader helper."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
NOT_PREPARED = "the default data is not prepared in {root}; run `quantizable data prepare`"


def default_data_dir() -> Path:
    """``$QUANTIZABLE_DATA`` if set, else ``~/.cache/quantizable/data`` (shared by every run of the project)."""
    env = os.environ.get("QUANTIZABLE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantizable" / "data"


def resolve_root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else default_data_dir()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def split_documents(documents: Sequence[T], split: str, fraction: float = VALIDATION_FRACTION) -> list[T]:
    """Deterministic split by whole documents, validation spread evenly over the corpus.

    Splitting by document (not by line or block) keeps a play, chapter or article on one side only, so
    validation perplexity is not flattered by text the model saw a few lines earlier.
    """
    check_split(split)
    n = len(documents)
    if n < 2:
        return list(documents) if split == "train" else []
    n_val = max(1, round(n * fraction))
    val_index = {int((j + 0.5) * n / n_val) for j in range(n_val)}
    keep_val = split == "validation"
    return [doc for i, doc in enumerate(documents) if (i in val_index) == keep_val]


def make_loader(dataset: Dataset, batch_size: int, collate: Callable[[list[dict]], dict[str, Any]] | None = None,
                shuffle: bool = False, seed: int = 0, workers: int = 0) -> DataLoader:
    """A DataLoader of dict batches; shuffling uses its own seeded generator so runs repeat exactly. ``workers``
    processes build the batches (the datasets' randomness depends on the item, never on the process)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator,
                      num_workers=workers)


def looks_like_path(source: str) -> bool:
    """A source meant as a local path (as opposed to a hub name such as ``owner/name``)."""
    return source.startswith(("/", ".", "~")) or source.endswith(".txt")


def load_hf_dataset(path: str, config: str | None, split: str) -> Any:
    """``datasets.load_dataset`` with its many failure types (offline, unknown name, bad split) as one ValueError."""
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as error:  # noqa: BLE001 - hub, network and script errors all mean "cannot use this source"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load dataset {path!r} (config {config}, split {split}) with "
                         f"datasets.load_dataset: {message}") from error
