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
STATES = ("estimate", "frozen", "off", "observe")


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
    """One quantization site: a range estimator plus the grid; states ``estimate`` / ``frozen`` / ``off`` /
    ``observe``.

    In ``estimate`` every call updates the range from the tensor and quantizes with it (as the reference code);
    ``frozen`` uses the fixed range (static quantization), its grid computed once; ``off`` passes the tensor
    through; ``observe`` passes it through and records the per-channel (last axis) absolute maximum in
    ``channel_absmax`` (for choosing outlier channels).

    Post-training-quantization options (:meth:`configure`, activations only; the PTQ baselines of
    ``quantization.ptq``): ``per_token`` (dynamic range per token, i.e. per last-axis row, at inference),
    ``kept_channels`` (last-axis indices left in floating point and out of the range), ``skip_positions`` (the
    first positions of the token axis likewise) and ``channel_scale`` (SmoothQuant: quantize ``x / s`` on the grid,
    return ``Q(x / s) * s``).
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
        self.per_token, self.skip_positions = False, 0
        self.sequence_length: int | None = None
        self.kept_channels: torch.Tensor | None = None
        self.channel_scale: torch.Tensor | None = None
        self.channel_absmax: torch.Tensor | None = None

    def configure(
        self,
        per_token: bool = False,
        kept_channels: torch.Tensor | None = None,
        skip_positions: int = 0,
        channel_scale: torch.Tensor | None = None,
    ) -> None:
        """Set the PTQ options (see the class docstring); the defaults are plain static per-tensor quantization."""
        if skip_positions < 0:
            raise ValueError(f"skip_positions must be at least 0, got {skip_positions}")
        if channel_scale is not None and not bool((channel_scale > 0).all()):
            raise ValueError("channel_scale must be positive")
        self.per_token, self.skip_positions = per_token, skip_positions
        self.kept_channels = None if kept_channels is None else kept_channels.to(self.x_min.device, torch.long)
        self.channel_scale = None if channel_scale is None else channel_scale.to(self.x_min.device, torch.float32)
        self._cache = None

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
        self.channel_absmax = None

    def _grid(self) -> Grid:
        """The grid, as Python floats per tensor (the fastest clamp) or ``(C,)`` tensors per channel."""
        grid = grid_of(self.x_min, self.x_max, self.bits, self.symmetric)
        return tuple(float(v) for v in grid) if self.channel_axis is None else grid

    @property
    def _has_options(self) -> bool:
        return (self.per_token or self.skip_positions > 0 or self.kept_channels is not None
                or self.channel_scale is not None)

    def _prefix_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """True at the skipped positions, broadcastable to ``x``: tokens are axis 1 of ``(B, T, D)``, axis 2 of
        ``(B, H, T, .)`` attention tensors, and rows ``i`` with ``i % T`` of flattened ``(B*T, D)`` ones (``T``:
        ``sequence_length``, set from the model's input)."""
        if not self.skip_positions:
            return None
        if x.dim() in (3, 4):
            axis = x.dim() - 2
            positions = torch.arange(x.shape[axis], device=x.device)
        elif x.dim() == 2 and self.sequence_length and x.shape[0] % self.sequence_length == 0:
            axis, positions = 0, torch.arange(x.shape[0], device=x.device) % self.sequence_length
        else:
            return None
        return (positions < self.skip_positions).reshape(-1, *[1] * (x.dim() - 1 - axis))

    def _range_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the static range is estimated on: smoothed, kept channels and skipped positions set to 0 (which
        every range contains, so they do not widen it)."""
        if self.channel_scale is not None:
            x = x / self.channel_scale
        if self.kept_channels is not None:
            x = x.index_fill(-1, self.kept_channels, 0.0)
        mask = self._prefix_mask(x)
        return x if mask is None else x.masked_fill(mask, 0.0)

    def _observe(self, x: torch.Tensor) -> None:
        absmax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "off":
            return x
        if self.state == "observe":
            self._observe(x)
            return x
        if self.state == "estimate":
            with torch.no_grad():
                previous = (self.x_min, self.x_max) if self.calibrated else None
                seen = self._range_input(x.detach())
                self.x_min, self.x_max = self.estimator.update(
                    seen, previous, self.bits, self.symmetric, self.channel_axis
                )
        if self._has_options:
            return self._quantize_with_options(x)
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

    def _quantize_with_options(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x / self.channel_scale if self.channel_scale is not None else x
        if self.per_token:
            low, high = scaled.detach().amin(dim=-1, keepdim=True), scaled.detach().amax(dim=-1, keepdim=True)
            out = quantize_to_grid(scaled, grid_of(low, high, self.bits, self.symmetric))
        else:
            out = self._quantize(scaled)
        if self.channel_scale is not None:
            out = out * self.channel_scale
        if self.kept_channels is not None:
            kept = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            kept[self.kept_channels] = True
            out = torch.where(kept, x, out)
        mask = self._prefix_mask(x)
        return out if mask is None else torch.where(mask, x, out)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {self.estimator.name}, state={self.state}"
