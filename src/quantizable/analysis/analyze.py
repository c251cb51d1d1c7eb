"""``analyze``: outlier metrics, their localisation and the paper's figures for one model and some batches."""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantizable.analysis.metrics import OUTLIER_STD, OutlierCounts, RunningStats, most_common, outlier_mask
from quantizable.analysis.recording import recording
from quantizable.models.families import attention_geometry, family_of_config

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
FIGURE_SEQUENCES = 3  # sequences of the first batch kept for the attention figures
MAIN_TENSOR = "block_out"  # the paper's "output of an attention layer" (a whole transformer block)
OUTLIER_TENSOR = "ffn_out"  # where the paper localises outliers (FFN output, Fig. 1)
_NEWLINE_TOKENS = {"\n", "Ċ", "<0x0A>", "ĊĊ"}


@dataclass
class _TokenLabels:
    """Readable token strings and whether each is a delimiter ([CLS], [SEP], <s>, punctuation, newline)."""

    tokenizer: Any = None
    cache: dict[int, tuple[str, bool]] = field(default_factory=dict)

    def label(self, token_id: int) -> tuple[str, bool]:
        if token_id not in self.cache:
            self.cache[token_id] = self._describe(token_id)
        return self.cache[token_id]

    def _describe(self, token_id: int) -> tuple[str, bool]:
        if self.tokenizer is None:
            return f"id:{token_id}", False
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        text = self.tokenizer.decode([token_id])
        special = token_id in set(self.tokenizer.all_special_ids)
        newline = "\n" in text or raw in _NEWLINE_TOKENS
        label = text.strip() or text.encode("unicode_escape").decode() or str(raw)
        punctuation = bool(text.strip()) and all(c in string.punctuation for c in text.strip())
        return label, special or newline or punctuation


@dataclass
class _Collector:
    """Receives the hooked tensors of one batch at a time and accumulates everything ``analyze`` reports."""

    labels: _TokenLabels
    stats: dict[tuple[int, str], RunningStats] = field(default_factory=dict)
    outliers: OutlierCounts = field(default_factory=OutlierCounts)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    first_outliers: dict[int, torch.Tensor] = field(default_factory=dict)
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    first_batch: bool = True

    def record(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name in ("probs", "value_norm"):
            store = self.probs if name == "probs" else self.value_norms
            store[layer] = x[:FIGURE_SEQUENCES].detach().float().cpu()
            return
        batch_size = next(iter(self.batch.values())).shape[0]
        if x.dim() == 2:  # OPT flattens (B, T, d) to (B*T, d) around its FFN
            x = x.view(batch_size, -1, x.shape[-1])
        mask = self.batch.get("attention_mask")
        self.stats.setdefault((layer, name), RunningStats()).update(x, mask)
        if name == OUTLIER_TENSOR:
            found = outlier_mask(x, mask)
            labels, delimiters = self._token_labels(x.shape[0], x.shape[1])
            self.outliers.add(layer, found, labels, delimiters)
            if self.first_batch:
                self.first_outliers[layer] = found[0].sum(-1).cpu()

    def _token_labels(self, batch_size: int, length: int) -> tuple[list[list[str]], torch.Tensor | None]:
        ids = self.batch.get("input_ids")
        if ids is None:  # images: token 0 is [CLS], then patches in raster order
            names = ["[CLS]"] + [f"patch {p}" for p in range(length - 1)]
            return [names] * batch_size, None
        described = [[self.labels.label(int(t)) for t in row] for row in ids.tolist()]
        labels = [[name for name, _ in row] for row in described]
        delimiters = torch.tensor([[delim for _, delim in row] for row in described], dtype=torch.bool)
        return labels, (delimiters if self.labels.tokenizer is not None else None)


def _check_choice(value: int | None, limit: int, what: str) -> None:
    if value is not None and not 0 <= value < limit:
        raise ValueError(f"{what} {value} out of range: this model has {limit} ({what}s 0..{limit - 1})")


def _per_layer(stats: dict[tuple[int, str], RunningStats]) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "tensor": name, "mean_inf_norm": s.mean_inf_norm, "max_inf_norm": s.inf_norm_max,
         "mean_kurtosis": s.mean_kurtosis, "sequences": s.count}
        for (layer, name), s in sorted(stats.items())
    ]


def _summary(per_layer: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's two numbers on block outputs, plus the same maximum on the other recorded tensors."""
    main = [row for row in per_layer if row["tensor"] == MAIN_TENSOR]
    worst = max(main, key=lambda row: row["mean_inf_norm"])
    summary = {
        "max_inf_norm": worst["mean_inf_norm"],
        "max_inf_norm_layer": worst["layer"],
        "avg_kurtosis": sum(row["mean_kurtosis"] for row in main) / len(main),
        "max_kurtosis": max(row["mean_kurtosis"] for row in main),
    }
    for key, prefix in (("attn_out", "attn_out"), ("ffn_out", "ffn_out"), ("ln_in", "ln_in.")):
        rows = [row["mean_inf_norm"] for row in per_layer if row["tensor"].startswith(prefix)]
        if rows:
            summary[f"max_{key}_inf_norm"] = max(rows)
    return summary


@torch.no_grad()
def analyze(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    tokenizer: Any = None,
    out_dir: str | Path | None = None,
    layer: int | None = None,
    head: int | None = None,
) -> dict[str, Any]:
    """Outlier metrics of ``model`` on ``batches`` (dicts with ``input_ids``/``attention_mask`` or ``pixel_values``).

    Returns (and with ``out_dir`` writes as ``metrics.json``, ``report.md`` and PNG figures) the paper's
    ``max_inf_norm`` and ``avg_kurtosis`` of block outputs, a per-layer table of every recorded tensor, and where
    the FFN-output outliers (> 6 std) sit: hidden dims, positions, tokens, delimiter share. ``layer``/``head``
    (zero-based) choose the attention figure; by default the layer with most outliers and the head holding its
    top outlier dimension. See docs/analysis.md for the exact definitions.
    """
    family = family_of_config(model.config)
    n_layers = model.config.num_hidden_layers
    _, n_heads, head_dim = attention_geometry(model.config)
    _check_choice(layer, n_layers, "layer")
    _check_choice(head, n_heads, "head")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collector = _Collector(_TokenLabels(tokenizer))
    first_inputs: dict[str, torch.Tensor] = {}
    try:
        for index, batch in enumerate(batches):
            inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            collector.batch, collector.first_batch = inputs, index == 0
            if index == 0:
                first_inputs = {k: v[:FIGURE_SEQUENCES].cpu() for k, v in inputs.items()}
            with recording(model, collector.record, with_attention=index == 0):
                model(**inputs)
    finally:
        model.train(was_training)
    if not collector.stats:
        raise ValueError("no batches to analyse")

    per_layer = _per_layer(collector.stats)
    counts = collector.outliers
    if layer is None:
        layer = max(counts.layers, key=counts.layers.get) if counts.layers else n_layers - 1
    if head is None:
        dims = counts.layer_dims.get(layer)
        head = max(dims, key=dims.get) // head_dim if dims else 0
    result: dict[str, Any] = {
        "model": type(model).__name__,
        "family": family.name,
        "sequences": collector.stats[(0, MAIN_TENSOR)].count,
        **_summary(per_layer),
        "per_layer": per_layer,
        "outliers": {
            "tensor": OUTLIER_TENSOR,
            "threshold_std": OUTLIER_STD,
            "total": counts.total,
            "dims": most_common(counts.dims),
            "positions": most_common(counts.positions),
            "tokens": most_common(counts.tokens),
            "layers": most_common(counts.layers),
            "delimiter_share": (counts.delimiter / counts.total
                                if counts.total and tokenizer is not None and "input_ids" in first_inputs else None),
        },
        "figure_layer": layer,
        "figure_head": head,
    }
    if out_dir is not None:
        from quantizable.analysis.report import write_outputs

        result["figures"] = write_outputs(result, collector, first_inputs, Path(out_dir), model.config)
    return result
