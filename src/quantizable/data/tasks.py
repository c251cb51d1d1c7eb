"""The data a training run of a task reads: training set, per-epoch collator and a seeded validation loader, built
from a run's ``data`` config (the trainer and ``reproduce``'s measurements use the same wiring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quantizable.data.common import make_loader
from quantizable.data.images import image_dataset
from quantizable.data.text import clm_collator, mlm_collator, text_dataset
from quantizable.tasks import Task

if TYPE_CHECKING:
    from quantizable.training.config import TrainConfig


@dataclass
class TaskData:
    """What the trainer needs from the data layer for one task."""

    train: Any
    collate: Callable[[int], Callable | None]  # the training collator of an epoch
    validation_loader: Callable[[], Any]  # a fresh loader with the same (seeded) batches every call
    tokens_per_sample: int  # for throughput: seq_len for text, 1 (image) for images


def task_data(config: TrainConfig, task: str, tokenizer: Any, model_config: Any = None) -> TaskData:
    """Training dataset, its collator and a validation-loader factory for ``task`` (a ``quantizable.tasks.Task``);
    images come at ``model_config``'s size and channels (default: grey 28x28)."""
    source, run = config.data.source, config.run
    if task == Task.IMAGE:
        # a folder or hub set is augmented (random resized crops, flips); the embedded Fashion-MNIST recipe is not
        train = image_dataset("train", source=source, config=model_config, augment=source is not None, seed=run.seed)
        validation = image_dataset("validation", source=source, config=model_config)

        def collate(epoch: int) -> None:
            train.set_epoch(epoch)  # the crops of epoch e depend on (seed, e, image) only
            return None

        make_eval_collate, tokens = lambda: None, 1
    else:
        train = text_dataset("train", tokenizer, config.data.seq_len, task, source=source)
        validation = text_dataset("validation", tokenizer, config.data.seq_len, task, source=source)
        tokens = config.data.seq_len
        if task == Task.MLM:
            # Masks are a function of (seed, epoch, block): they change every epoch, yet do not depend on when the
            # loader (which prefetches) draws random numbers, so a resumed run sees the same masks.
            def collate(epoch: int) -> Callable:
                epoch_seed = run.seed + 1_000_003 * (epoch + 1)
                return mlm_collator(tokenizer, config.data.mlm_probability, seed=epoch_seed)

            make_eval_collate = lambda: mlm_collator(tokenizer, config.data.mlm_probability, seed=run.seed)
        else:
            collate = lambda epoch: clm_collator()
            make_eval_collate = clm_collator
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"the {task} data has no training or validation samples "
                         f"(data.seq_len={config.data.seq_len} too long for it?)")

    def validation_loader():
        loader = make_loader(validation, run.batch_size, make_eval_collate(), shuffle=False, seed=run.seed)
        loader.generator = torch.Generator().manual_seed(run.seed)  # iterating it must not draw from the global RNG
        return loader

    return TaskData(train, collate, validation_loader, tokens)
