"""The floating-point (or simulated-quantized) quality metric of every family, computed one way everywhere.

Batches are dicts: text ``{"input_ids", "attention_mask"?, "labels"}`` (MLM labels are -100 except at masked
positions; CLM labels equal input_ids, shifted inside the model) and images ``{"pixel_values", "labels"}``.
Perplexity is token-weighted: ``exp(total NLL / number of predicted tokens)``, so it does not depend on how the
data is batched (the paper's code averaged batch means instead). Accuracy is top-1 in percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantizable.models.families import Task, family_of_config


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float | str]:
    """``{"metric": "perplexity" | "accuracy", "value": float, "count": int}`` over the batches."""
    family = family_of_config(model.config)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    iterator = tqdm(batches, desc="evaluate", total=max_batches, leave=False, disable=not progress)
    for index, batch in enumerate(iterator):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if family.task is Task.IMAGE:
            total += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
            continue
        if family.task is Task.CLM:
            logits, labels = logits[:, :-1], labels[:, 1:]
        valid = labels != -100
        nll = nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
        total += nll.item()
        count += int(valid.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation saw no labelled tokens or images")
    value = 100.0 * total / count if family.task is Task.IMAGE else math.exp(total / count)
    return {"metric": family.task.metric, "value": value, "count": count}


def degradation(fp: float, quantized: float, metric: str) -> float:
    """Quantization loss: relative perplexity increase (%) or absolute accuracy drop (points)."""
    return 100.0 * (quantized - fp) / fp if metric == "perplexity" else fp - quantized


def metric_unit(metric: str) -> str:
    """What follows a metric's value when printed: accuracy is a percentage, perplexity a plain number."""
    return "%" if metric == "accuracy" else ""
