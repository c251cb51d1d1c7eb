"""Named quantization setups: which placement rules, grid and calibration recipe a W8A8 number was measured with.

``default`` is our own setup (docs/quantization.md says why each choice differs); ``paper`` follows the paper's
official code (section 5, appendix C.4, and the description of the reference implementation), so that our W8A8
numbers can be read next to the paper's. A setup selects rules that the one placement mechanism applies to every
family; the few facts that only the official code knows per family (OPT quantizes the attention context before the
gate, OPT's calibration recipe) are data here, not code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantizable.quantization.quantizers import MIN_SCALE, FakeQuantizer, Grid


@dataclass(frozen=True)
class Calibration:
    """Range estimators and the calibration batches (``seq_len`` None: the run's own sequence length)."""

    weight_estimator: str = "current_minmax"
    act_estimator: str = "running_minmax"
    batches: int = 16
    batch_size: int = 8
    seq_len: int | None = None


@dataclass(frozen=True)
class QuantSetup:
    """Placement rules, weight grid and per-family calibration of one setup."""

    name: str
    # No site on the output of the linear layer the FFN activation reads: Linear + activation are one fused op.
    fuse_linear_activation: bool = False
    # BERT: one more site on word + token-type embeddings, before the positions are added.
    partial_embedding_sum: bool = False
    # Pre-LN: the mid-block residual sum is quantized in place where the second norm reads it, so the FFN's residual
    # add uses the same quantized sum (hooks otherwise quantize only the norm's copy).
    shared_residual: bool = False
    # Symmetric weights with no negative value (LayerNorm gamma, usually) use the unsigned grid 0..2^b-1.
    unsigned_nonnegative_weights: bool = False
    # Families whose attention context is quantized before the gate (the gated product then enters the output
    # projection unquantized).
    context_before_gate: frozenset[str] = frozenset()
    calibration: dict[str, Calibration] = field(default_factory=dict)  # family name -> recipe; others: default
    default_calibration: Calibration = Calibration()

    def calibration_for(self, family: str) -> Calibration:
        return self.calibration.get(family, self.default_calibration)


SETUPS: dict[str, QuantSetup] = {setup.name: setup for setup in (
    QuantSetup("default"),
    QuantSetup(
        "paper",
        fuse_linear_activation=True,
        partial_embedding_sum=True,
        shared_residual=True,
        unsigned_nonnegative_weights=True,
        context_before_gate=frozenset({"opt"}),
        # Appendix C.4: min-max weights, running min-max activations over 16 training batches; OPT: MSE weights and
        # the 99.999th percentile (the official validation script calibrates OPT on 4 batches of 1 x 512).
        calibration={"opt": Calibration("mse", "percentile:99.999", batches=4, batch_size=1, seq_len=512)},
    ),
)}


def get_setup(name: str) -> QuantSetup:
    if name not in SETUPS:
        raise ValueError(f"unknown quantization setup {name!r}; known: {', '.join(SETUPS)}")
    return SETUPS[name]


class UnsignedWhenNonNegative(FakeQuantizer):
    """A symmetric per-tensor quantizer that switches to the unsigned grid ``0 .. 2^b-1`` when its range holds no
    negative value (the official quantizer's rule): half the step of ``-2^(b-1) .. 2^(b-1)-1`` on such tensors."""

    def _grid(self) -> Grid:
        if self.channel_axis is None and float(self.x_min) >= 0:
            levels = 2**self.bits - 1
            scale = max(float(self.x_max), MIN_SCALE) / levels
            return scale, 0.0, scale * levels
        return super()._grid()
