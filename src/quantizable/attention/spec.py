"""The attention specification: which no-op mechanism a model uses, as a JSON-serialisable dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from quantizable.attention.softmax import gamma_from_alpha, validate_clip_params

# Every no-op mechanism, in the order reports list them; docs/mechanisms.md has one row per kind.
KINDS = ("vanilla", "clipped_softmax", "gated_attention", "softmax_plus_one", "sink_token", "key_bias", "sigmoid",
         "softpick", "value_gate", "sink_logit")
GATE_TYPES = ("linear", "mlp", "all_heads_linear", "elementwise")
# How the query and key projections of a freshly built model are initialised. The initial score spread (std of
# q.k/sqrt(d_head) in a row) is about d_model * std_w^2 for LayerNorm'd inputs: 0.04 with N(0, 0.02) at d = 128,
# so every probability of a row is near 1/T, below clipped softmax's threshold -gamma/(zeta-gamma) once
# -gamma*T > ~1, and the layer is dead from step 0 (docs/reproduce.md, "Clipped softmax at initialisation").
#   family:       the family's own init (transformers' _init_weights, e.g. N(0, 0.02)): the paper's description
#   lecun:        weights N(0, 1/d_model), score spread about 1, biases as the family's (zero)
#   torch_linear: nn.Linear's default (uniform +-1/sqrt(d_model), weights and biases; score spread about 1/3): what
#                 the paper's official code got, since it swaps in fresh nn.Linear q/k/v without re-initialising them
QK_INITS = ("family", "lecun", "torch_linear")
# Kinds whose attention is not a softmax over the tokens: they materialise their probabilities (no SDPA kernel).
MATERIALISED_KINDS = ("clipped_softmax", "softmax_plus_one", "sigmoid", "softpick", "sink_logit")
# Kinds whose probabilities can be exactly zero with zero gradient, so a row (or a whole layer) can stop learning.
ZEROING_KINDS = ("clipped_softmax", "softpick")
# Kinds that add one learnable key (and value) column that every query can attend to.
EXTRA_KEY_KINDS = ("sink_token", "key_bias")


@dataclass(frozen=True)
class AttentionSpec:
    """How attention normalises and gates its output.

    kind: ``vanilla`` (softmax on SDPA), ``clipped_softmax`` (paper 4.1), ``gated_attention`` (paper 4.2, on SDPA),
        or a comparison mechanism from later papers (docs/mechanisms.md): ``softmax_plus_one``, ``sink_token``
        (learnable key/value per layer, on SDPA), ``key_bias`` (learnable key with zero value, on SDPA),
        ``sigmoid`` (unnormalised ``sigmoid(x - log T)``), ``softpick`` (rectified softmax), ``value_gate``
        (each value vector scaled by a sigmoid of itself, on SDPA) or ``sink_logit`` (a learned extra logit per
        head, gpt-oss's sinks: softmax+1 with a learned logit).
    gamma / zeta: clipped softmax stretch; give ``alpha`` and ``seq_len`` instead for ``gamma = -alpha / seq_len``
        where ``seq_len`` is the configured training length T.
    seq_len: also sigmoid attention's T in its bias ``b = -log T``; ``None`` there means the key length of the row.
    gate_type / pi_init / n_hid: gated attention; the last gate bias starts at ``logit(pi_init)``, so the initial
        gate probability is about ``pi_init``. ``value_gate`` uses ``pi_init`` the same way.
    eps: softpick's denominator epsilon (the paper's code: 1e-8), which keeps an all-masked row at zero.
    qk_init: how a model built from scratch initialises its query and key projections (``QK_INITS``); a model
        converted from pretrained weights keeps them.
    """

    kind: str = "vanilla"
    gamma: float | None = None
    zeta: float = 1.0
    alpha: float | None = None
    seq_len: int | None = None
    gate_type: str = "linear"
    pi_init: float = 0.5
    n_hid: int = 4
    eps: float = 1e-8
    qk_init: str = "family"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "clipped_softmax":
            if self.gamma is None and (self.alpha is None or self.seq_len is None):
                raise ValueError("clipped_softmax needs gamma, or alpha together with seq_len (gamma = -alpha/seq_len)")
            if self.gamma is not None and self.alpha is not None:
                raise ValueError("give either gamma or alpha for clipped_softmax, not both")
            validate_clip_params(self.resolved_gamma(), self.zeta)
        else:
            given = {name: value for name, value in (("gamma", self.gamma), ("alpha", self.alpha)) if value is not None}
            if self.zeta != 1.0:
                given["zeta"] = self.zeta
            if given:  # they would be ignored: only clipped softmax stretches its probabilities
                raise ValueError(f"gamma, zeta and alpha only apply to kind clipped_softmax, got "
                                 f"{', '.join(f'{k}={v}' for k, v in given.items())} with kind {self.kind!r}")
        if self.seq_len is not None and (int(self.seq_len) != self.seq_len or self.seq_len < 1):
            raise ValueError(f"seq_len (T) must be a positive integer, got {self.seq_len}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0 (softpick's denominator epsilon), got {self.eps}")
        if self.qk_init not in QK_INITS:
            raise ValueError(f"qk_init must be one of {', '.join(QK_INITS)}, got {self.qk_init!r}")
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
        return self.kind in MATERIALISED_KINDS

    @property
    def exact_zeros(self) -> bool:
        """Whether attention entries can be exactly zero with zero gradient (clipped softmax, softpick)."""
        return self.kind in ZEROING_KINDS

    @property
    def extra_key(self) -> bool:
        """Whether attention gets one more, learnable key column (``sink_token``, ``key_bias``)."""
        return self.kind in EXTRA_KEY_KINDS

    def resolved_gamma(self) -> float:
        if self.kind != "clipped_softmax":
            return 0.0
        if self.gamma is not None:
            return float(self.gamma)
        return gamma_from_alpha(self.alpha, self.seq_len)

    def clip_threshold(self) -> float:
        """The probability at or below which clipped softmax outputs an exact zero (and passes no gradient)."""
        gamma = self.resolved_gamma()
        return -gamma / (self.zeta - gamma)

    def with_gamma_scaled(self, fraction: float) -> "AttentionSpec":
        """This spec with gamma (and zeta - 1) scaled by ``fraction`` in [0, 1]: a step of a gamma warm-up."""
        if self.kind != "clipped_softmax":
            return self
        return replace(self, gamma=fraction * self.resolved_gamma(), alpha=None,
                       zeta=1.0 + fraction * (self.zeta - 1.0))

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
        init = "" if self.qk_init == "family" else f", q/k init {self.qk_init}"
        return self._describe_kind() + init

    def _describe_kind(self) -> str:
        if self.kind == "clipped_softmax":
            return f"clipped softmax (gamma={self.resolved_gamma():.5g}, zeta={self.zeta:g})"
        if self.kind == "gated_attention":
            extra = f", n_hid={self.n_hid}" if self.gate_type == "mlp" else ""
            return f"gated attention ({self.gate_type}, pi_init={self.pi_init:g}{extra})"
        if self.kind == "sigmoid":
            return f"sigmoid attention (b = -log {self.seq_len or 'T_key'})"
        if self.kind == "value_gate":
            return f"value-state gate (pi_init={self.pi_init:g})"
        return self.kind.replace("_", " ")


def spec_for_method(method: str, **overrides: Any) -> AttentionSpec:
    """The paper's default settings for each method name used in reports."""
    defaults: dict[str, dict[str, Any]] = {
        **{kind: {} for kind in KINDS},
        "clipped_softmax": {"gamma": -0.025},
        "gated_attention": {"gate_type": "linear", "pi_init": 0.25},
    }
    if method not in defaults:
        raise ValueError(f"method must be one of {', '.join(defaults)}, got {method!r}")
    params = {**defaults[method], **overrides}
    if "alpha" in params:
        params.pop("gamma", None)
    return AttentionSpec(kind=method, **params)
