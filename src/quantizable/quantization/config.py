"""``QuantConfig``: what the post-training quantization simulator quantizes and how (torchao-style dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantizable.quantization.estimators import parse_estimator
from quantizable.quantization.setups import get_setup

MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantConfig:
    """Simulated W{weight_bits}A{act_bits} quantization with static ranges (paper section 5, W8A8 by default).

    Weights: symmetric, per-tensor (or per output channel), range from ``weight_estimator``; activations:
    asymmetric per-tensor, range from ``act_estimator`` (``running_minmax``, ``current_minmax``,
    ``percentile:P`` or ``mse``). ``quantize_head=False`` keeps the final LM head / classifier in floating point.
    ``setup`` names the placement rules and weight grid (``quantization.setups``: ``default`` or ``paper``, the
    paper's official code); the estimators stay as given (``setups.get_setup(name).calibration_for(family)`` is
    the setup's recipe, which the CLI applies unless an estimator is given explicitly).
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_estimator: str = "current_minmax"
    act_estimator: str = "running_minmax"
    per_channel_weights: bool = False
    quantize_head: bool = False
    quantize_weights: bool = True
    quantize_acts: bool = True
    setup: str = "default"

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(f"{field} must be an integer from {MIN_BITS} to {MAX_BITS}, got {value!r}")
        get_setup(self.setup)
        for field in ("weight_estimator", "act_estimator"):
            try:
                parse_estimator(getattr(self, field))
            except ValueError as error:
                raise ValueError(f"{field}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
