"""What every INT8 backend shares: the logits-only export wrapper, a model adapter for evaluation, timing.

A backend turns our HF model into *logits functions* (a batch of named tensors -> logits). ``LogitsModel`` makes
such a function look like the HF model to ``quantizable.evaluation.evaluate`` and ``median_latencies_ms`` times
several of them on one batch, so FP32 and INT8 of every backend are scored and timed by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from quantizable.benchmarking import cpu_flags, interleaved_times, medians

Batch = dict[str, torch.Tensor]
# The SIMD features that decide INT8 GEMM speed (benchmarking.SPEED_FLAGS): VNNI / AMX dot products give ~4x the FP32
# multiply-accumulate rate, plain AVX2 (vpmaddubsw + vpmaddwd) ~2x (bench_gemm_limit measured 1.7-2.2x on AVX2 EPYC).
# The flags of 8-bit dot products that accumulate straight into int32 (no int16 intermediate that can saturate).
DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8")
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


def latency_samples_ms(functions: dict[str, LogitsFn], batch: Batch, repeats: int = 20,
                       warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall times (ms) of ``repeats`` forward passes on ``batch`` per logits function, after ``warmup`` untimed
    rounds, interleaved by the benchmarks' one timing loop (``benchmarking.interleaved_times``). ``clock``:
    ``time.process_time`` times this process's CPU time instead (with one thread, the latency other processes on a
    shared CPU do not stretch)."""
    inputs = {name: batch[name] for name in input_names(batch)}
    calls = {name: (lambda function=function: function(inputs)) for name, function in functions.items()}
    with torch.no_grad():
        seconds = interleaved_times(calls, repeats, warmup, clock=clock)
    return {name: [1000.0 * value for value in values] for name, values in seconds.items()}


def median_latencies_ms(functions: dict[str, LogitsFn], batch: Batch, repeats: int = 20,
                        warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median wall time (ms) of one forward pass on ``batch`` per logits function (``latency_samples_ms``)."""
    return medians(latency_samples_ms(functions, batch, repeats, warmup, clock))


def has_int8_dot_product() -> bool:
    """Whether this CPU has VNNI / AMX 8-bit dot products (``DOT_PRODUCT_FLAGS``)."""
    return bool(set(cpu_flags()) & set(DOT_PRODUCT_FLAGS))
