"""The data a saved model goes with: its run's data settings, its tokenizer and its task's splits.

``analyze``, ``quantize`` and ``export`` all take a run directory, a Hugging Face checkpoint or a GGUF file and need
the same answers: which tokenizer, which text or image source, which sequence length. They come from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from quantizable.data.common import make_loader
from quantizable.data.images import image_dataset
from quantizable.data.text import checkpoint_tokenizer, clm_collator, load_tokenizer, mlm_collator, text_dataset
from quantizable.tasks import Task

# The project tokenizer a task uses when neither the checkpoint nor its run names one.
DEFAULT_TOKENIZER = {Task.MLM: "wordpiece", Task.CLM: "bpe"}
DEFAULT_SEQ_LEN = 128
# The MLM masks of the evaluation batches in every verb, so one run scores the same through each of them.
EVAL_MASK_SEED = 1234


def position_limit(config: Any) -> int | None:
    """The most tokens the model's position embeddings cover (``None``: no limit in its config, or an image model)."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, name, None)
        if isinstance(limit, int):
            return limit
    return None


def resolve_seq_len(requested: int | None, model: Any, task: str, run_seq_len: int | None) -> int | None:
    """``--seq-len``, else the run's ``data.seq_len``, else 128 capped at the position limit; ``None`` for images.

    An explicit length above the limit is refused: positions past it have no embedding (an index error deep in the
    model), and the attention matrices grow with its square (``export --seq-len 100000`` once filled 24 GB)."""
    if task == Task.IMAGE:
        if requested is not None:
            raise ValueError("--seq-len does not apply to an image model (its sequence is the image's patches)")
        return None
    limit = position_limit(model.config)
    if requested is None:
        if run_seq_len:
            return run_seq_len
        return DEFAULT_SEQ_LEN if limit is None else min(DEFAULT_SEQ_LEN, limit)
    if requested < 4:
        raise ValueError(f"--seq-len must be at least 4, got {requested}")
    if limit is not None and requested > limit:
        raise ValueError(f"--seq-len {requested} is above the model's position limit ({limit} tokens); use "
                         f"--seq-len 4..{limit}")
    return requested


def run_data_settings(path: str | Path) -> dict[str, Any]:
    """The ``data`` section of a run directory's configuration (``{}`` for anything that is not a run)."""
    if not (Path(path) / "config.yaml").is_file():
        return {}
    from quantizable.training.config import TrainConfig  # the training layer sits above this one

    return dataclasses.asdict(TrainConfig.from_run(path).data)


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
    embedded data), tokenized with ``model_tokenizer`` at ``seq_len`` (the user's ``--seq-len``, checked by
    :func:`resolve_seq_len`), checked against the model's vocabulary."""
    settings = run_data_settings(path)
    source = settings.get("source")
    seq_len = resolve_seq_len(seq_len, model, task, settings.get("seq_len"))
    if task == Task.IMAGE:
        return CheckpointData(image_dataset("train", source, config=model.config),
                              image_dataset("validation", source, config=model.config), lambda seed: None)
    tokenizer = model_tokenizer(path, task)
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}")
    train = text_dataset("train", tokenizer, seq_len, task, source=source)
    validation = text_dataset("validation", tokenizer, seq_len, task, source=source)
    if task == Task.MLM:
        probability = settings.get("mlm_probability", 0.15)
        return CheckpointData(train, validation, lambda seed: mlm_collator(tokenizer, probability, seed=seed))
    return CheckpointData(train, validation, lambda seed: clm_collator())


@dataclass(frozen=True)
class ScoringData:
    """The batches a saved model is calibrated and scored on, built the same way by every verb and benchmark.

    Calibration seed ``s`` shuffles the training split with ``s`` and (MLM) masks with ``s``; evaluation reads the
    validation split in order, masked with ``EVAL_MASK_SEED``. ``reproduce`` once masked with the run's training
    collator instead, so a BERT run's W8A8 differed between ``reproduce`` and ``quantize``."""

    splits: CheckpointData
    batch_size: int
    calib_batches: int
    eval_batches: int | None  # None: the whole validation split

    def calibration(self, seed: int) -> list[dict[str, Any]]:
        loader = make_loader(self.splits.train, self.batch_size, self.splits.collate(seed), shuffle=True, seed=seed)
        return list(islice(loader, self.calib_batches))

    def evaluation(self) -> Iterable[dict[str, Any]]:
        """A fresh pass over the evaluation batches (the same batches every call)."""
        loader = make_loader(self.splits.validation, self.batch_size, self.splits.collate(EVAL_MASK_SEED))
        return loader if self.eval_batches is None else islice(loader, self.eval_batches)


def scoring_data(path: str | Path, model: Any, task: str, *, batch_size: int, calib_batches: int,
                 eval_batches: int | None = None, seq_len: int | None = None) -> ScoringData:
    """:class:`ScoringData` of the model saved at ``path`` (splits as :func:`checkpoint_data`); refuses more
    calibration or evaluation batches than its splits hold, rather than silently using fewer."""
    splits = checkpoint_data(path, model, task, seq_len)
    for flag, asked, split in (("--calib-batches", calib_batches, splits.train),
                               ("--eval-batches", eval_batches, splits.validation)):
        available = -(-len(split) // batch_size)  # the last batch may be short
        if asked is not None and asked > available:
            name = "training" if split is splits.train else "validation"
            raise ValueError(f"{flag} {asked} exceeds the {available} batches of {batch_size} in the {name} split")
    return ScoringData(splits, batch_size, calib_batches, eval_batches)
