"""``analyze``: outlier metrics, their localisation and the paper's figures for one model and some batches."""

from __future__ import annotations

import string
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantizable.analysis.mechanism import MechanismStats
from quantizable.analysis.metrics import OUTLIER_STD, OutlierCounts, RunningStats, most_common, outlier_mask
from quantizable.analysis.paper_metrics import covers_family, recording_paper_metrics
from quantizable.analysis.recording import recording
from quantizable.analysis.report import FigureData
from quantizable.models.families import Task, attention_geometry, family_of_config
from quantizable.models.modeling import attention_modules

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
    mechanism: MechanismStats
    causal: bool
    zeroing_layers: set[int]  # layers whose attention kind outputs exact zeros (AttentionSpec.exact_zeros)
    flattened_tokens: bool  # the family's FFN sees (B*T, d) (Family.flattens_ffn_tokens)
    registers: int = 0  # ViT register tokens, the last positions: outside every statistic but their own
    stats: dict[tuple[int, str], RunningStats] = field(default_factory=dict)
    register_stats: dict[int, RunningStats] = field(default_factory=dict)  # per layer, block output on registers
    outliers: OutlierCounts = field(default_factory=OutlierCounts)
    figure: FigureData = field(default_factory=FigureData)
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None  # (B, T) non-padding tokens of the current batch
    token_labels: list[list[str]] = field(default_factory=list)
    delimiters: torch.Tensor | None = None  # (B, T); None for text without a tokenizer
    first_batch: bool = True

    def start_batch(self, inputs: dict[str, torch.Tensor], first: bool) -> None:
        self.batch, self.first_batch = inputs, first
        self.valid, self.delimiters, self.token_labels = None, None, []
        ids = inputs.get("input_ids")
        if ids is None:  # images: the token count is known from the first recorded tensor (_image_tokens)
            return
        described = [[self.labels.label(int(t)) for t in row] for row in ids.tolist()]
        self.token_labels = [[name for name, _ in row] for row in described]
        delimiters = torch.tensor([[delim for _, delim in row] for row in described], dtype=torch.bool)
        self.delimiters = delimiters if self.labels.tokenizer is not None else None
        mask = inputs.get("attention_mask")
        self.valid = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()

    def _image_tokens(self, length: int) -> None:
        """Token 0 is [CLS], then patches in raster order; [CLS] is the only sink and delimiter of an image. Register
        tokens (last) count as padding: no statistic, outlier count or mechanism metric reads them."""
        batch_size, patches = self.batch["pixel_values"].shape[0], length - 1 - self.registers
        self.token_labels = [["[CLS]"] + [f"patch {p}" for p in range(patches)]
                             + [f"register {r}" for r in range(self.registers)]] * batch_size
        self.valid = (torch.arange(length) <= patches).expand(batch_size, length)
        self.delimiters = self.valid & (torch.arange(length) == 0)

    def record(self, layer: int, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        if self.valid is None:
            self._image_tokens(x.shape[-1] if name == "probs" else x.shape[1])
        if name == "gate":
            self.mechanism.add_gates(layer, x, self.valid)
            return
        if name in ("probs", "value_norm"):
            if name == "probs":
                self.mechanism.add_attention(layer, x, self.valid, self.delimiters, self.causal,
                                             layer in self.zeroing_layers)
            else:
                self.mechanism.add_value_norms(layer, x, self.valid)
            if self.first_batch:
                store = self.figure.probs if name == "probs" else self.figure.value_norms
                store[layer] = x[:FIGURE_SEQUENCES].float().cpu()
            return
        batch_size = next(iter(self.batch.values())).shape[0]
        if self.flattened_tokens and x.dim() == 2:
            x = x.view(batch_size, -1, x.shape[-1])
        self.stats.setdefault((layer, name), RunningStats()).update(x, self.valid)
        if name == MAIN_TENSOR:
            self.mechanism.add_hidden(layer, x, self.valid)
            if self.registers:
                self.register_stats.setdefault(layer, RunningStats()).update(x[:, -self.registers:])
        if name == OUTLIER_TENSOR:
            found = outlier_mask(x, self.valid)
            self.outliers.add(layer, found, self.token_labels, self.delimiters if "input_ids" in self.batch else None)
            if self.first_batch:
                self.figure.first_outliers[layer] = found[0].sum(-1).cpu()


def _check_choice(value: int | None, limit: int, what: str) -> None:
    if value is not None and not 0 <= value < limit:
        raise ValueError(f"{what} {value} out of range: this model has {limit} ({what}s 0..{limit - 1})")


def _per_layer(stats: dict[tuple[int, str], RunningStats]) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "tensor": name, "mean_inf_norm": s.mean_inf_norm, "max_inf_norm": s.inf_norm_max,
         "mean_kurtosis": s.mean_kurtosis, "sequences": s.count}
        for (layer, name), s in sorted(stats.items())
    ]


def _register_summary(count: int, stats: dict[int, RunningStats]) -> dict[str, Any] | None:
    """The block-output metrics of the register tokens alone, defined as ``max_inf_norm`` / ``avg_kurtosis`` are on
    the image tokens: did the registers take the high-norm tokens?"""
    if not count:
        return None
    per_layer = [stats[layer].mean_inf_norm for layer in sorted(stats)]
    worst = max(range(len(per_layer)), key=per_layer.__getitem__)
    return {"count": count, "max_inf_norm": per_layer[worst], "max_inf_norm_layer": worst,
            "avg_kurtosis": sum(s.mean_kurtosis for s in stats.values()) / len(stats),
            "per_layer_inf_norm": per_layer}


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
    the FFN-output outliers (> 6 std) sit: hidden dims, positions, tokens, delimiter share; a ViT's register tokens
    are left out of all of these and reported on their own (``registers``); and the no-op
    mechanism over all batches (``analysis.mechanism``): attention share on the first token and on delimiters per
    layer and head, value drain, first-token residual peak, gate statistics and, for kinds with exact zeros (clipped softmax, softpick), the alive
    share (allowed entries above zero) and dead rows (all zero) per layer, and the layers with no alive entry. ``layer``/``head``
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
    zeroing = {i for i, m in enumerate(attention_modules(model))
               if getattr(m, "attention_spec", None) is not None and m.attention_spec.exact_zeros}
    registers = getattr(model.config, "registers", 0)
    collector = _Collector(_TokenLabels(tokenizer), MechanismStats(n_layers), family.task is Task.CLM, zeroing,
                           family.flattens_ffn_tokens, registers)
    collector.figure.registers = registers
    official = recording_paper_metrics(model) if covers_family(model) else nullcontext(None)
    try:
        with official as paper:
            for index, batch in enumerate(batches):
                inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
                collector.start_batch(inputs, index == 0)
                if index == 0:
                    collector.figure.inputs = {k: v[:FIGURE_SEQUENCES].cpu() for k, v in inputs.items()}
                with recording(model, collector.record, with_attention=True):
                    model(**inputs)
                if index == 0:
                    collector.figure.token_names = collector.token_labels[:FIGURE_SEQUENCES]
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
            "delimiter_share": (counts.delimiter / counts.total if counts.total and collector.delimiters is not None
                                and "input_ids" in collector.batch else None),
        },
        **collector.mechanism.summary(),
        "registers": _register_summary(registers, collector.register_stats),  # None: no registers
        # the official scripts' pooling and kurtosis formula (analysis.paper_metrics); None: no official code
        "paper_metrics": paper.summary() if paper is not None else None,
        "figure_layer": layer,
        "figure_head": head,
    }
    if out_dir is not None:
        from quantizable.analysis.report import write_outputs

        result["figures"] = write_outputs(result, collector.figure, Path(out_dir), model.config)
    return result
