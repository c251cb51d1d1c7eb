"""The attention specification: which no-op mechanism a model uses, as a JSON-serialisable dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from quantizable.attention.softmax import gamma_from_alpha, validate_clip_params

KINDS = ("vanilla", "clipped_softmax", "gated_attention", "softmax_plus_one")
GATE_TYPES = ("linear", "mlp", "all_heads_linear", "elementwise")


@dataclass(frozen=True)
class AttentionSpec:
    """How attention normalises and gates its output.

    kind: ``vanilla`` (softmax on SDPA), ``clipped_softmax`` (paper 4.1), ``gated_attention`` (paper 4.2, on SDPA),
        or ``softmax_plus_one`` (a comparison mechanism, not in the paper).
    gamma / zeta: clipped softmax stretch; give ``alpha`` and ``seq_len`` instead for ``gamma = -alpha / seq_len``
        where ``seq_len`` is the configured training length T.
    gate_type / pi_init / n_hid: gated attention; the last gate bias starts at ``logit(pi_init)``, so the initial
        gate probability is about ``pi_init``.
    """

    kind: str = "vanilla"
    gamma: float | None = None
    zeta: float = 1.0
    alpha: float | None = None
    seq_len: int | None = None
    gate_type: str = "linear"
    pi_init: float = 0.5
    n_hid: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "clipped_softmax":
            if self.gamma is None and (self.alpha is None or self.seq_len is None):
                raise ValueError("clipped_softmax needs gamma, or alpha together with seq_len (gamma = -alpha/seq_len)")
            if self.gamma is not None and self.alpha is not None:
                raise ValueError("give either gamma or alpha for clipped_softmax, not both")
            validate_clip_params(self.resolved_gamma(), self.zeta)
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {', '.join(GATE_TYPES)}, got {self.gate_type!r}")
        if not 0.0 < self.pi_init < 1.0:
            raise ValueError(f"pi_init must lie in the open interval (0, 1), got {self.pi_init}")
        if int(self.n_hid) != self.n_hid or self.n_hid < 1:
            raise ValueError(f"n_hid must be an integer >= 1, got {self.n_hid}")

    @property
    def gated(self) -> bool:
        return self.kind == "gated_attention"

    @property
    def needs_probabilities(self) -> bool:
        """Whether the attention probabilities must be materialised (no fused SDPA kernel computes them)."""
        return self.kind in ("clipped_softmax", "softmax_plus_one")

    def resolved_gamma(self) -> float:
        if self.kind != "clipped_softmax":
            return 0.0
        if self.gamma is not None:
            return float(self.gamma)
        return gamma_from_alpha(self.alpha, self.seq_len)

    @property
    def gate_bias_init(self) -> float:
        return math.log(self.pi_init / (1.0 - self.pi_init))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AttentionSpec":
        if not data:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown attention spec field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def describe(self) -> str:
        if self.kind == "clipped_softmax":
            return f"clipped softmax (gamma={self.resolved_gamma():.5g}, zeta={self.zeta:g})"
        if self.kind == "gated_attention":
            extra = f", n_hid={self.n_hid}" if self.gate_type == "mlp" else ""
            return f"gated attention ({self.gate_type}, pi_init={self.pi_init:g}{extra})"
        return self.kind.replace("_", " ")


def spec_for_method(method: str, **overrides: Any) -> AttentionSpec:
    """The paper's default settings for each method name used in reports."""
    defaults: dict[str, dict[str, Any]] = {
        "vanilla": {},
        "clipped_softmax": {"gamma": -0.025},
        "gated_attention": {"gate_type": "linear", "pi_init": 0.25},
        "softmax_plus_one": {},
    }
    if method not in defaults:
        raise ValueError(f"method must be one of {', '.join(defaults)}, got {method!r}")
    params = {**defaults[method], **overrides}
    if "alpha" in params:
        params.pop("gamma", None)
    return AttentionSpec(kind=method, **params)
