"""What every INT8 backend shares: the logits-only export wrapper, a model adapter for evaluation, timing.

A backend turns our HF model into *logits functions* (a batch of named tensors -> logits). ``LogitsModel`` makes
such a function look like the HF model to ``quantizable.evaluation.evaluate`` and ``median_latencies_ms`` times
several of them on one batch, so FP32 and INT8 of every backend are scored and timed by the same code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LogitsFn = Callable[[Batch], torch.Tensor]
LABELS = "labels"


def input_names(batch: Batch) -> list[str]:
    """The model inputs of a batch (everything but the labels), in a fixed order."""
    names = sorted(name for name in batch if name != LABELS)
    if not names:
        raise ValueError("the batch has no model inputs (only labels)")
    return names


class LogitsOnly(nn.Module):
    """Positional inputs -> logits: what an exported graph of the model takes and returns."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


class LogitsModel(nn.Module):
    """A logits function that looks like our HF model to ``quantizable.evaluation.evaluate`` (``config``, a
    device, ``model(**batch).logits``), so every backend's logits go through exactly the same metric code."""

    def __init__(self, logits: LogitsFn, config: Any) -> None:
        super().__init__()
        self.logits, self.config = logits, config
        self._device = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits(batch))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch intra-op threads set to ``threads`` inside the block, so its timings match ORT's thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def median_latencies_ms(functions: dict[str, LogitsFn], batch: Batch, repeats: int = 20,
                        warmup: int = 3) -> dict[str, float]:
    """Median wall time (ms) of one forward pass on ``batch`` per logits function. Runs are interleaved, so load
    from other processes on a shared CPU hits every function alike and their ratio stays meaningful."""
    inputs = {name: batch[name] for name in input_names(batch)}
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.no_grad():
        for step in range(warmup + repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                function(inputs)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}

