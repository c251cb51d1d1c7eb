"""Range estimators: which ``[x_min, x_max]`` a quantizer uses, from the tensors it sees during calibration.

* ``current_minmax``: min/max of the latest tensor (weights default);
* ``running_minmax``: exponential moving average of per-batch min/max, momentum 0.9 (activations default);
* ``percentile:P``: the (100-P)th / Pth percentiles per batch (``kthvalue`` on the tensor's device), then the EMA;
* ``mse``: per batch, the clipping range (a fraction of min/max on a 100-point grid) with the least squared
  quantization error, then the EMA.

Per-channel ranges reduce over every axis but ``channel_axis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizable.quantization.quantizers import fake_quantize

MOMENTUM = 0.9
MSE_GRID = 100
MSE_MAX_ELEMENTS = 1 << 20  # the MSE search runs on a strided subsample of bigger tensors
PERCENTILE_MAX_ELEMENTS = 1 << 24  # and percentiles likewise, to bound time and memory
ESTIMATORS = ("current_minmax", "running_minmax", "percentile:P", "mse")


@dataclass(frozen=True)
class RangeEstimator:
    """A parsed estimator: ``method`` in minmax/percentile/mse, ``momentum`` None for the latest batch only."""

    name: str
    method: str
    momentum: float | None = MOMENTUM
    percentile: float | None = None

    def batch_range(
        self, x: torch.Tensor, bits: int, symmetric: bool, channel_axis: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = _flatten(x.float(), channel_axis)
        if self.method == "percentile":
            return _percentile_range(flat, self.percentile)
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        if self.method == "mse":
            return _mse_range(flat, low, high, bits, symmetric)
        return low, high

    def update(
        self,
        x: torch.Tensor,
        previous: tuple[torch.Tensor, torch.Tensor] | None,
        bits: int,
        symmetric: bool,
        channel_axis: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new range after seeing ``x`` (shape ``()`` per tensor, ``(C,)`` per channel)."""
        low, high = self.batch_range(x, bits, symmetric, channel_axis)
        if channel_axis is None:
            low, high = low.squeeze(0), high.squeeze(0)
        if previous is None or self.momentum is None:
            return low, high
        m = self.momentum
        return m * previous[0] + (1 - m) * low, m * previous[1] + (1 - m) * high


def _flatten(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def _subsample(flat: torch.Tensor, limit: int) -> torch.Tensor:
    step = -(-flat.shape[1] // max(1, limit // flat.shape[0]))
    return flat[:, ::step] if step > 1 else flat


def _percentile_range(flat: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = _subsample(flat, PERCENTILE_MAX_ELEMENTS)
    n = flat.shape[1]
    k_high = min(n, max(1, round(percentile / 100 * n)))
    k_low = max(1, n + 1 - k_high)
    return flat.kthvalue(k_low, dim=1).values, flat.kthvalue(k_high, dim=1).values


def _mse_range(
    flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    sample = _subsample(flat, MSE_MAX_ELEMENTS)
    best_error = torch.full_like(low, float("inf"))
    best_low, best_high = low.clone(), high.clone()
    for fraction in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist():
        c_low, c_high = low * fraction, high * fraction
        error = (fake_quantize(sample, c_low[:, None], c_high[:, None], bits, symmetric) - sample).pow(2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_low, best_high = torch.where(better, c_low, best_low), torch.where(better, c_high, best_high)
    return best_low, best_high


def parse_estimator(text: str) -> RangeEstimator:
    """``current_minmax``, ``running_minmax``, ``percentile:99.999`` (0 < P <= 100) or ``mse``."""
    name = text.strip().lower()
    if name == "current_minmax":
        return RangeEstimator(name, "minmax", momentum=None)
    if name == "running_minmax":
        return RangeEstimator(name, "minmax")
    if name == "mse":
        return RangeEstimator(name, "mse")
    if name.startswith("percentile:"):
        try:
            value = float(name.split(":", 1)[1])
        except ValueError:
            value = float("nan")
        if not 50 < value <= 100:
            raise ValueError(f"percentile must be a number in (50, 100], e.g. percentile:99.999; got {text!r}")
        return RangeEstimator(name, "percentile", percentile=value)
    raise ValueError(f"unknown range estimator {text!r}; known: {', '.join(ESTIMATORS)}")
