"""Mechanism metrics: how heads "do nothing" (paper section 3 and Fig. 2; Guo et al. 2024, arXiv 2410.13835).

A head with nothing to update puts its attention on a *sink* (the first token, or a delimiter such as [SEP]), whose
value vector is small ("value drain"), so the head's output is close to zero; the first token's residual stream
grows a large norm to make that possible ("residual peak"). Clipped softmax lets a head reach exact zeros instead,
and gated attention lets it close its gate. The functions below measure each of these on one batch of hooked
tensors; ``MechanismStats`` sums them over batches and layers. Exact definitions: docs/analysis.md.

Shapes: ``probs`` ``(B, H, T, T)`` (queries x keys), ``valid`` ``(B, T)`` bool (non-padding tokens), hidden states
``(B, T, d)``, value norms ``(B, T, H_kv)``, gates ``(B, T, H, k)`` with ``k`` 1 or ``d_head``. The sink is the first
valid token of each sequence (position 0 with right padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DORMANT_SHARE = 0.5  # a head is dormant when at least half of its queries' attention mass sits on the sink
GATE_CLOSED = 0.1  # a gate below this is counted as closed
GATE_BINS = 20  # histogram bins of gate values on [0, 1]


def first_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of each sequence's first non-padding token: the sink, whatever the padding side."""
    return valid.int().argmax(dim=1)


def _one_hot(index: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=index.device)[None, :] == index[:, None]


def sink_queries(valid: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` queries whose attention is measured: valid ones except the sink's own row, which in causal
    models can only attend to itself (100% on the first token by construction)."""
    return valid & ~_one_hot(first_valid(valid), valid.shape[1])


def attention_mass(probs: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Per head ``(H,)``: the sum over ``queries`` ``(B, T)`` of the probability each puts on ``keys`` ``(B, T)``;
    ``(H, K)`` for ``K`` key sets at once (``keys`` ``(B, T, K)``, one matmul).

    Divided by ``queries.sum()`` this is the mean share of attention on those keys; sums add up over batches."""
    sets = keys if keys.dim() == 3 else keys[..., None]
    if probs.dim() != 4 or probs.shape[-1] != sets.shape[1] or probs.shape[-2] != queries.shape[1]:
        raise ValueError(f"probs must be (B, H, T, T) matching the (B, T) masks, got {tuple(probs.shape)} "
                         f"with keys {tuple(keys.shape)} and queries {tuple(queries.shape)}")
    on_keys = torch.matmul(probs.float(), sets[:, None].float()).double()  # (B, H, T, K): row sums stay exact
    mass = (on_keys * queries[:, None, :, None]).sum((0, 2))
    return mass if keys.dim() == 3 else mass[:, 0]


def allowed_pairs(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(B, T, T)`` query-key pairs the model may attend: both tokens valid and, if causal, key <= query."""
    pairs = valid[:, :, None] & valid[:, None, :]
    if causal:
        pairs = pairs & torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()
    return pairs


def zero_counts(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per head ``(H,)``: how many allowed probabilities are exactly zero (clipped softmax's "attend to nothing")."""
    return ((probs == 0) & allowed[:, None]).sum((0, 2, 3))


def dead_row_counts(probs: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head ``(H,)``: how many query rows have every allowed probability exactly zero, and how many rows have
    any allowed key. Such a row outputs zero and passes no gradient to its scores (clipped softmax, softpick)."""
    has_keys = allowed.any(-1)  # (B, T)
    alive = ((probs != 0) & allowed[:, None]).any(-1)  # (B, H, T)
    return (~alive & has_keys[:, None]).sum((0, 2)), has_keys.sum()

def _median_of_others(values: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Lower median over dim 1 of ``values`` ``(B, T, ...)`` where ``others`` ``(B, T)``: a real token's value."""
    mask = others.reshape(*others.shape, *([1] * (values.dim() - 2)))
    return values.double().masked_fill(~mask, float("nan")).nanmedian(dim=1).values


def sink_ratios(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, T, ...)`` of the sink over the median of the other valid tokens, per sequence ``(B', ...)``.

    Sequences with fewer than two valid tokens have no "other" token and are left out."""
    sink = first_valid(valid)
    others = valid & ~_one_hot(sink, valid.shape[1])
    keep = others.any(dim=1)
    sink_values = values[torch.arange(values.shape[0], device=values.device), sink].double()
    return (sink_values / _median_of_others(values, others))[keep]


def value_drain(value_norms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B', H_kv)``: each head's sink value norm ``||v_sink||`` over the median token's ``||v_t||``; near zero
    when the sink is a no-op target (attending it changes nothing)."""
    return sink_ratios(value_norms, valid)


def residual_peaks(hidden: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B',)`` twice: the sink's residual-stream L2 norm and its ``max |x|``, each over the median token's."""
    hidden = hidden.double()
    return sink_ratios(hidden.norm(dim=-1), valid), sink_ratios(hidden.abs().amax(dim=-1), valid)


@dataclass
class GateCounts:
    """Per-head sums of gate values over tokens (and channels): mean, closed share and histogram."""

    total: torch.Tensor  # (H,) sum of gate values
    closed: torch.Tensor  # (H,) how many are < GATE_CLOSED
    count: torch.Tensor  # (H,) how many gate values
    histogram: torch.Tensor  # (H, GATE_BINS) counts on [0, 1]

    def __add__(self, other: GateCounts) -> GateCounts:
        return GateCounts(self.total + other.total, self.closed + other.closed, self.count + other.count,
                          self.histogram + other.histogram)


def gate_counts(gates: torch.Tensor, valid: torch.Tensor) -> GateCounts:
    """Gate probabilities ``(B, T, H, k)`` of the valid tokens, summed per head."""
    if gates.dim() != 4 or gates.shape[:2] != valid.shape:
        raise ValueError(f"gates must be (B, T, H, k) matching valid {tuple(valid.shape)}, got {tuple(gates.shape)}")
    per_head = gates.double()[valid].transpose(0, 1).reshape(gates.shape[2], -1)  # (H, N * k)
    bins = (per_head * GATE_BINS).long().clamp(0, GATE_BINS - 1)
    histogram = torch.zeros(per_head.shape[0], GATE_BINS, dtype=torch.float64, device=gates.device)
    histogram.scatter_add_(1, bins, torch.ones_like(per_head))
    return GateCounts(per_head.sum(1), (per_head < GATE_CLOSED).sum(1).double(),
                      torch.full((per_head.shape[0],), float(per_head.shape[1]), dtype=torch.float64), histogram)


@dataclass
class _Sums:
    """Running sums of one metric per layer: ``value`` tensors and the count each is divided by."""

    value: dict[int, torch.Tensor] = field(default_factory=dict)
    count: dict[int, torch.Tensor | float] = field(default_factory=dict)

    def add(self, layer: int, value: torch.Tensor, count: torch.Tensor | float) -> None:
        value = value.detach().double().cpu()
        count = count.detach().double().cpu() if isinstance(count, torch.Tensor) else float(count)
        if layer in self.value:
            self.value[layer] = self.value[layer] + value
            self.count[layer] = self.count[layer] + count
        else:
            self.value[layer], self.count[layer] = value, count

    def means(self, n_layers: int) -> list[torch.Tensor] | None:
        if not self.value:
            return None
        return [self.value[layer] / self.count[layer] for layer in range(n_layers)]


def _lists(rows: list[torch.Tensor] | None) -> list | None:
    return None if rows is None else [row.tolist() for row in rows]


@dataclass
class MechanismStats:
    """Sums of the mechanism metrics over all analysed batches, per layer; ``summary`` gives analyze's keys."""

    n_layers: int
    sink: _Sums = field(default_factory=_Sums)
    delimiter: _Sums = field(default_factory=_Sums)
    sink_or_delimiter: _Sums = field(default_factory=_Sums)
    null: _Sums = field(default_factory=_Sums)
    zeros: _Sums = field(default_factory=_Sums)
    dead_rows: _Sums = field(default_factory=_Sums)
    values: _Sums = field(default_factory=_Sums)
    residual_norm: _Sums = field(default_factory=_Sums)
    residual_max_abs: _Sums = field(default_factory=_Sums)
    gates: dict[int, GateCounts] = field(default_factory=dict)

    def add_attention(self, layer: int, probs: torch.Tensor, valid: torch.Tensor, delimiters: torch.Tensor | None,
                      causal: bool, zeroing: bool) -> None:
        """One batch of ``(B, H, T, T)`` probabilities; ``delimiters`` ``(B, T)`` bool or None when unknown;
        ``zeroing``: the layer's kind outputs exact zeros (``AttentionSpec.exact_zeros``), whose shares are then counted."""
        probs = probs.detach()
        valid = valid.to(probs.device)
        queries = sink_queries(valid)
        n_queries = queries.sum()
        first = _one_hot(first_valid(valid), valid.shape[1]) & valid
        sets = [first, valid]
        if delimiters is not None:
            delimiters = delimiters.to(probs.device) & valid
            sets += [delimiters, delimiters | first]
        mass = attention_mass(probs, torch.stack(sets, dim=-1), queries)  # (H, len(sets))
        self.sink.add(layer, mass[:, 0], n_queries)
        self.null.add(layer, n_queries - mass[:, 1], n_queries)
        if delimiters is not None:
            self.delimiter.add(layer, mass[:, 2], n_queries)
            self.sink_or_delimiter.add(layer, mass[:, 3], n_queries)
        if zeroing:
            allowed = allowed_pairs(valid, causal)
            self.zeros.add(layer, zero_counts(probs, allowed), allowed.sum())
            self.dead_rows.add(layer, *dead_row_counts(probs, allowed))

    def add_value_norms(self, layer: int, value_norms: torch.Tensor, valid: torch.Tensor) -> None:
        ratios = value_drain(value_norms, valid.to(value_norms.device))
        self.values.add(layer, ratios.sum(0), ratios.shape[0])

    def add_hidden(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        norm, max_abs = residual_peaks(hidden, valid.to(hidden.device))
        self.residual_norm.add(layer, norm.sum(), norm.shape[0])
        self.residual_max_abs.add(layer, max_abs.sum(), max_abs.shape[0])

    def add_gates(self, layer: int, gates: torch.Tensor, valid: torch.Tensor) -> None:
        counts = gate_counts(gates.detach(), valid.to(gates.device))
        counts = GateCounts(*(t.cpu() for t in (counts.total, counts.closed, counts.count, counts.histogram)))
        self.gates[layer] = self.gates[layer] + counts if layer in self.gates else counts

    def summary(self) -> dict[str, Any]:
        """analyze's mechanism keys: per-head tables are lists of ``n_layers`` lists, per-layer ones lists."""
        n = self.n_layers
        sink = self.sink.means(n)
        delimiter, union = self.delimiter.means(n), self.sink_or_delimiter.means(n)
        values = self.values.means(n)
        norm, max_abs = self.residual_norm.means(n), self.residual_max_abs.means(n)
        if sink is None or values is None or norm is None:
            raise ValueError("mechanism metrics need attention probabilities, value norms and block outputs")
        sink_per_layer = [float(row.mean()) for row in sink]
        value_per_layer = [float(row.mean()) for row in values]
        norm_per_layer, max_abs_per_layer = [float(x) for x in norm], [float(x) for x in max_abs]
        heads = torch.stack(sink)
        gates = None if not self.gates else [self.gates[layer] for layer in range(n)]
        zeros, dead_rows = self.zeros.means(n), self.dead_rows.means(n)
        # alive: allowed entries above zero, which are the only ones that pass gradient to the scores
        alive_per_layer = None if zeros is None else [1.0 - float(row.mean()) for row in zeros]
        return {
            "sink_share": max(sink_per_layer),
            "sink_share_per_layer": sink_per_layer,
            "sink_share_per_head": _lists(sink),
            "delimiter_share_per_layer": None if delimiter is None else [float(row.mean()) for row in delimiter],
            "delimiter_share_per_head": _lists(delimiter),
            "sink_or_delimiter_share_per_head": _lists(union),
            "null_share_per_head": _lists(self.null.means(n)),
            "dormant_share": float((heads >= DORMANT_SHARE).double().mean()),
            "dormant_share_with_delimiters": (None if union is None else
                                              float((torch.stack(union) >= DORMANT_SHARE).double().mean())),
            "value_drain": max(value_per_layer),
            "value_drain_min": min(value_per_layer),
            "value_drain_per_layer": value_per_layer,
            "value_drain_per_head": _lists(values),
            "residual_peak": max(norm_per_layer),
            "residual_peak_per_layer": norm_per_layer,
            "residual_peak_max_abs": max(max_abs_per_layer),
            "residual_peak_max_abs_per_layer": max_abs_per_layer,
            "gate_mean_per_head": None if gates is None else [(g.total / g.count).tolist() for g in gates],
            "gate_closed_share_per_head": None if gates is None else [(g.closed / g.count).tolist() for g in gates],
            "gate_histogram_per_head": (None if gates is None else
                                        [(g.histogram / g.count[:, None]).tolist() for g in gates]),
            "clipped_zero_share_per_head": _lists(zeros),
            "alive_share": None if alive_per_layer is None else min(alive_per_layer),
            "alive_share_per_layer": alive_per_layer,
            "dead_row_share_per_layer": None if dead_rows is None else [float(row.mean()) for row in dead_rows],
            "dead_row_share_per_head": _lists(dead_rows),
            "dead_layers": None if alive_per_layer is None else [i for i, a in enumerate(alive_per_layer) if a == 0.0],
        }
