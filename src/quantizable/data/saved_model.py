"""The data a saved model goes with: its run's data settings, its tokenizer and its task's splits.

``analyze``, ``quantize`` and ``export`` all take a run directory, a Hugging Face checkpoint or a GGUF file and need
the same answers: which tokenizer, which text or image source, which sequence length. They come from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantizable.data.images import image_dataset
from quantizable.data.text import checkpoint_tokenizer, clm_collator, load_tokenizer, mlm_collator, text_dataset

# The project tokenizer a task uses when neither the checkpoint nor its run names one.
DEFAULT_TOKENIZER = {"mlm": "wordpiece", "clm": "bpe"}


def run_data_settings(path: str | Path) -> dict[str, Any]:
    """The ``data`` section of a run directory's ``config.yaml`` (``{}`` for anything that is not a run)."""
    config_file = Path(path) / "config.yaml"
    if not config_file.is_file():
        return {}
    import yaml

    return (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}


def model_tokenizer(path: str | Path, task: str | None = None) -> Any:
    """The checkpoint's own tokenizer, else its run's ``data.tokenizer``, else (given a text ``task``) the project
    default for the task; ``None`` when none applies, e.g. for an image model."""
    tokenizer = checkpoint_tokenizer(path)
    if tokenizer is not None:
        return tokenizer
    name = run_data_settings(path).get("tokenizer") or DEFAULT_TOKENIZER.get(task or "")
    return load_tokenizer(name) if name else None


@dataclass(frozen=True)
class CheckpointData:
    """Training and validation splits of a model's task and a collator factory (seed -> collate function)."""

    train: Any
    validation: Any
    collate: Callable[[int], Any]


def checkpoint_data(path: str | Path, model: Any, task: str, seq_len: int | None = None) -> CheckpointData:
    """The splits the model saved at ``path`` is calibrated and scored on: its run's data source (default: the
    embedded data), tokenized with ``model_tokenizer`` at ``seq_len`` (default: the run's ``data.seq_len``, else
    128), checked against the model's vocabulary."""
    settings = run_data_settings(path)
    source = settings.get("source")
    if task == "image":
        return CheckpointData(image_dataset("train", source), image_dataset("validation", source), lambda seed: None)
    tokenizer = model_tokenizer(path, task)
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}")
    seq_len = seq_len or settings.get("seq_len") or 128
    train = text_dataset("train", tokenizer, seq_len, task, source=source)
    validation = text_dataset("validation", tokenizer, seq_len, task, source=source)
    if task == "mlm":
        return CheckpointData(train, validation, lambda seed: mlm_collator(tokenizer, seed=seed))
    return CheckpointData(train, validation, lambda seed: clm_collator())
