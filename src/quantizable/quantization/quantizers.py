"""Uniform affine fake quantization, paper eq. (1): ``x_hat = s * (clip(round(x / s) + z, n, p) - z)``.

Weights are symmetric (``z = 0``, integers ``-2^(b-1) .. 2^(b-1)-1``); activations asymmetric (integers
``0 .. 2^b-1``, the range widened to contain 0 so that zero is exact, ``z`` rounded and clamped). Rounding uses the
straight-through estimator: its gradient is 1, and the clip passes gradient only inside the range.

Because ``z``, ``n`` and ``p`` are integers, eq. (1) equals ``s * round(clip(x, s(n - z), s(p - z)) / s)``: one clamp,
one division, one rounding and one product, which runs in place when no gradient is needed (torch's fused
``fake_quantize_per_tensor_affine`` is about 10x slower on CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from quantizable.quantization.estimators import RangeEstimator

MIN_SCALE = 1e-8
STATES = ("estimate", "frozen", "off")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


def quant_params(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, zero_point, int_min, int_max)`` for a range; the range is widened to contain 0."""
    x_min, x_max = torch.clamp(x_min, max=0.0), torch.clamp(x_max, min=0.0)
    if symmetric:
        int_min, int_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = torch.maximum(-x_min, x_max).clamp(min=MIN_SCALE) / int_max
        return scale, torch.zeros_like(scale), int_min, int_max
    int_min, int_max = 0, 2**bits - 1
    scale = ((x_max - x_min) / int_max).clamp(min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(-x_min / scale), int_min, int_max)
    return scale, zero_point, int_min, int_max


Grid = tuple[torch.Tensor | float, torch.Tensor | float, torch.Tensor | float]


def grid_of(x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool) -> Grid:
    """``(scale, lowest, highest representable value)`` of the grid for a range."""
    scale, zero_point, int_min, int_max = quant_params(x_min, x_max, bits, symmetric)
    return scale, (int_min - zero_point) * scale, (int_max - zero_point) * scale


def quantize_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Eq. (1) on a precomputed grid; STE gradient when autograd needs one, in-place arithmetic otherwise."""
    scale, low, high = grid
    if torch.is_grad_enabled() and x.requires_grad:
        return round_ste(torch.clamp(x, low, high) / scale) * scale
    return torch.clamp(x, low, high).div_(scale).round_().mul_(scale)


def fake_quantize(
    x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto the ``bits``-bit grid of ``[x_min, x_max]`` (broadcast per channel)."""
    return quantize_to_grid(x, grid_of(x_min, x_max, bits, symmetric))


class FakeQuantizer(nn.Module):
    """One quantization site: a range estimator plus the grid; states ``estimate`` / ``frozen`` / ``off``.

    In ``estimate`` every call updates the range from the tensor and quantizes with it (as the reference code);
    ``frozen`` uses the fixed range (static quantization), its grid computed once; ``off`` passes the tensor
    through.
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool,
        estimator: RangeEstimator,
        channel_axis: int | None = None,
        cache_frozen: bool = False,
    ) -> None:
        super().__init__()
        self.bits, self.symmetric, self.estimator, self.channel_axis = bits, symmetric, estimator, channel_axis
        self.cache_frozen = cache_frozen  # weights: reuse the quantized tensor while frozen and not training
        self.state = "off"
        self.register_buffer("x_min", torch.tensor(float("nan")), persistent=False)
        self.register_buffer("x_max", torch.tensor(float("nan")), persistent=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._frozen_grid: Grid | None = None

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.x_min).any())

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"quantizer state must be one of {STATES}, got {state!r}")
        if state == "frozen" and not self.calibrated:
            raise RuntimeError("cannot freeze a quantizer that has seen no data; run calibrate() first")
        self.state, self._cache = state, None
        self._frozen_grid = self._grid() if state == "frozen" else None

    def reset(self) -> None:
        self.x_min, self.x_max = torch.full_like(self.x_min, float("nan")), torch.full_like(self.x_max, float("nan"))
        self._cache = self._frozen_grid = None

    def _grid(self) -> Grid:
        """The grid, as Python floats per tensor (the fastest clamp) or ``(C,)`` tensors per channel."""
        grid = grid_of(self.x_min, self.x_max, self.bits, self.symmetric)
        return tuple(float(v) for v in grid) if self.channel_axis is None else grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "off":
            return x
        if self.state == "estimate":
            with torch.no_grad():
                previous = (self.x_min, self.x_max) if self.calibrated else None
                self.x_min, self.x_max = self.estimator.update(
                    x.detach(), previous, self.bits, self.symmetric, self.channel_axis
                )
        elif self.cache_frozen and not torch.is_grad_enabled():  # fixed weights: quantize once per version
            key = (x.data_ptr(), x._version, tuple(x.shape))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._quantize(x))
            return self._cache[1]
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._frozen_grid or self._grid()
        if self.channel_axis is not None:
            shape = [1] * x.dim()
            shape[self.channel_axis] = -1
            grid = tuple(v.reshape(shape) for v in grid)
        return quantize_to_grid(x, grid)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {self.estimator.name}, state={self.state}"
