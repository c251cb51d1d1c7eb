"""Outlier statistics of activation tensors, computed per sequence as in the paper's code.

A tensor of shape ``(B, T, d)`` is read as ``B`` sequences; the statistics of one sequence use all of its
``T * d`` values at once (padding positions excluded). ``inf_norm`` is ``max |x|`` of the sequence and
``kurtosis`` is the non-excess kurtosis ``E[(x - mu)^4] / Var[x]^2`` (3 for Gaussian data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OUTLIER_STD = 6.0  # paper footnote 1 (after Bondarenko et al. 2021): beyond 6 standard deviations of the tensor


def sequences(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The flattened values of every sequence of ``x`` (``(B, T, ...)``) in float64, padding positions dropped."""
    x = x.detach().double()
    if attention_mask is None or bool(attention_mask.all()):
        return list(x.reshape(x.shape[0], -1))
    keep = attention_mask.bool().to(x.device)
    return [x[b][keep[b]].reshape(-1) for b in range(x.shape[0])]


def inf_norm(values: torch.Tensor) -> float:
    """``max |x|`` of one flattened sequence."""
    return float(values.abs().max())


def kurtosis(values: torch.Tensor) -> float:
    """Non-excess kurtosis ``m4 / m2^2`` with population moments (Gaussian: 3, uniform: 1.8)."""
    values = values.double().reshape(-1)
    centred = values - values.mean()
    m2 = centred.pow(2).mean()
    return float(centred.pow(4).mean() / m2.pow(2))


@dataclass
class RunningStats:
    """Per-tensor sums of per-sequence inf-norms and kurtoses over the validation sequences."""

    inf_norm_sum: float = 0.0
    inf_norm_max: float = 0.0
    kurtosis_sum: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        for values in sequences(x, attention_mask):
            norm = inf_norm(values)
            self.inf_norm_sum += norm
            self.inf_norm_max = max(self.inf_norm_max, norm)
            self.kurtosis_sum += kurtosis(values)
            self.count += 1

    @property
    def mean_inf_norm(self) -> float:
        return self.inf_norm_sum / self.count

    @property
    def mean_kurtosis(self) -> float:
        return self.kurtosis_sum / self.count


def outlier_mask(x: torch.Tensor, attention_mask: torch.Tensor | None = None, n_std: float = OUTLIER_STD) -> torch.Tensor:
    """Boolean ``(B, T, d)`` mask of values further than ``n_std`` standard deviations from the tensor's mean.

    Mean and standard deviation are those of the whole tensor (all sequences, padding excluded)."""
    x = x.detach().double()
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if attention_mask is not None:
        keep = attention_mask.bool().to(x.device)
    valid = x[keep]
    mean, std = valid.mean(), valid.std(unbiased=False)
    return ((x - mean).abs() > n_std * std) & keep.unsqueeze(-1)


@dataclass
class OutlierCounts:
    """Where outliers sit: counts per hidden dimension, token position, token label and layer."""

    dims: dict[int, int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    layers: dict[int, int] = field(default_factory=dict)
    layer_dims: dict[int, dict[int, int]] = field(default_factory=dict)
    delimiter: int = 0
    total: int = 0

    def add(self, layer: int, mask: torch.Tensor, labels: list[list[str]], delimiters: torch.Tensor | None) -> None:
        """Count the outliers of ``mask`` ``(B, T, d)``; ``labels[b][t]`` names the token, ``delimiters`` (B, T)."""
        b_idx, t_idx, d_idx = mask.nonzero(as_tuple=True)
        if len(b_idx) == 0:
            return
        per_layer = self.layer_dims.setdefault(layer, {})
        for b, t, d in zip(b_idx.tolist(), t_idx.tolist(), d_idx.tolist()):
            self.dims[d] = self.dims.get(d, 0) + 1
            per_layer[d] = per_layer.get(d, 0) + 1
            self.positions[t] = self.positions.get(t, 0) + 1
            label = labels[b][t]
            self.tokens[label] = self.tokens.get(label, 0) + 1
            if delimiters is not None and bool(delimiters[b, t]):
                self.delimiter += 1
        self.layers[layer] = self.layers.get(layer, 0) + len(b_idx)
        self.total += len(b_idx)


def most_common(counts: dict, limit: int | None = None) -> list[list]:
    """``[[key, count], ...]`` most frequent first (ties by key)."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return [[key, count] for key, count in ranked[:limit]]
