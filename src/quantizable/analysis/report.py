"""Figures (matplotlib, Agg) and the ``metrics.json`` / ``report.md`` files of ``analyze``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantizable.io import write_json_atomic, write_text_atomic

MAX_TICK_LABELS = 48  # token names on heatmap axes, at 6 pt or more (128 were 3.5 pt: unreadable); longer: every n-th
MAX_ANNOTATED_CELLS = 400  # per-head heat maps print their numbers up to this many cells
MAX_FIGURE_WIDTH = 18.0  # inches (1,620 px at the heat maps' 90 dpi)
MAX_HEAD_TICKS = 32  # head numbers on a heat map's axis; more heads: every n-th one
NULL_SHOWN = 1e-3  # the no-token share gets a heat map once some head's rows sum this far from 1


@dataclass
class FigureData:
    """What the per-sequence figures show: tensors of the first few sequences of the first batch, per layer."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # model inputs of those sequences
    token_names: list[list[str]] = field(default_factory=list)  # [sequence][position] readable token
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # (S, H, T, T) attention probabilities
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)  # (S, T, H_kv) value-vector norms
    first_outliers: dict[int, torch.Tensor] = field(default_factory=dict)  # (T,) ffn_out outliers of sequence 0
    registers: int = 0  # ViT register tokens at the end of the sequence (not patches: no place in the grids)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def outlier_histograms(result: dict[str, Any], hidden_size: int, path: Path) -> Path:
    """Paper Fig. 1: outlier counts per hidden dimension, per token position and per token string."""
    plt = _pyplot()
    outliers = result["outliers"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    dims = torch.zeros(hidden_size)
    for dim, count in outliers["dims"]:
        dims[dim] = count
    axes[0].vlines(range(hidden_size), 0, dims.tolist(), color="tab:green", linewidth=2)
    for dim, count in outliers["dims"][:3]:
        axes[0].annotate(f"#{dim}", (dim, count), ha="center", va="bottom", fontsize=8)
    axes[0].set(title="outliers per hidden dimension", xlabel="hidden dimension", ylabel="count")
    positions = outliers["positions"]
    axes[1].vlines([p for p, _ in positions], 0, [c for _, c in positions], color="tab:blue", linewidth=2)
    axes[1].set(title="outliers per token position", xlabel="token position", ylabel="count")
    top = outliers["tokens"][:15][::-1]
    axes[2].barh([str(t) for t, _ in top], [c for _, c in top], color="tab:blue")
    share = outliers["delimiter_share"]
    share_text = "" if share is None else f" ({100 * share:.0f}% delimiters)"
    axes[2].set(title=f"outliers per token{share_text}", xlabel="count")
    if not outliers["total"]:
        for ax in axes:
            ax.text(0.5, 0.5, "no outliers", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{result['model']}: values > {outliers['threshold_std']:g} std in {outliers['tensor']} "
                 f"(all layers, {outliers['total']} outliers)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def attention_heatmaps(data: FigureData, layer: int, head: int, n_heads: int, path: Path) -> Path:
    """Paper Fig. 2: attention probabilities, value norms ``||v_j||`` and their product ``p_ij ||v_j||``."""
    plt = _pyplot()
    probs = data.probs[layer][:, head]  # (S, T, T)
    value_norms = data.value_norms[layer]  # (S, T, H_kv)
    kv_head = head // (n_heads // value_norms.shape[-1])
    mask = data.inputs.get("attention_mask")
    rows = probs.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.6 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 0.12, 1]})
    for s in range(rows):
        length = int(mask[s].sum()) if mask is not None else probs.shape[-1]
        p = probs[s, :length, :length]
        v = value_norms[s, :length, kv_head]
        panels = ((p, "attention probabilities"), (v[:, None], "||v||"), (p * v[None, :], "probabilities x ||v||"))
        names = data.token_names[s][:length]
        step = max(1, math.ceil(length / MAX_TICK_LABELS))  # label every step-th token
        ticks, fontsize = range(0, length, step), max(3.5, min(7.0, 300 / len(range(0, length, step))))
        for ax, (matrix, title) in zip(axes[s], panels):
            image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046 if matrix.shape[1] > 1 else 0.5)
            wide = matrix.shape[1] > 1  # the narrow ||v|| column gets a short title
            ax.set_title(f"sequence {s}: {title}" if wide else title, fontsize=10 if wide else 8)
            ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=fontsize)
            if wide:
                ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=fontsize, rotation=90)
            else:
                ax.set_xticks([])
    fig.suptitle(f"layer {layer}, head {head} (zero-based)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)  # the token labels stay legible
    plt.close(fig)
    return path


def vit_patch_grids(data: FigureData, layer: int, head: int, path: Path) -> Path:
    """Paper Fig. 3: the image, outliers per patch in layer ``layer`` and the attention each patch receives in
    head ``head`` of the next layer (column sums of its probability matrix), and that matrix."""
    plt = _pyplot()
    attention_layer = min(layer + 1, max(data.probs))
    patches = slice(1, data.first_outliers[layer].numel() - data.registers)
    outliers = data.first_outliers[layer][patches].float()
    probs = data.probs[attention_layer][0, head]
    received = probs.sum(0)[patches]
    side = math.isqrt(outliers.numel())
    image = data.inputs["pixel_values"][0]
    image = (image - image.min()) / (image.max() - image.min() + 1e-12)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
    axes[0].set_title("input image")
    grids = ((outliers, f"outliers per patch, layer {layer}"),
             (received, f"attention received, layer {attention_layer} head {head}"))
    for ax, (values, title) in zip(axes[1:3], grids):
        shown = ax.imshow(values.reshape(side, side).numpy(), cmap="magma")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
    shown = axes[3].imshow(probs.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(shown, ax=axes[3], fraction=0.046)
    registers = f", last {data.registers} = registers" if data.registers else ""
    axes[3].set_title(f"attention probabilities (token 0 = [CLS]{registers})", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _head_panels(result: dict[str, Any]) -> list[tuple[str, list[list[float]]]]:
    panels = [("attention share on the first token", result["sink_share_per_head"])]
    optional = (("delimiter_share_per_head", "attention share on delimiters"),
                ("gate_closed_share_per_head", "share of gates closed (< 0.1)"),
                ("clipped_zero_share_per_head", "share of exact zeros (clipped softmax, softpick)"),
                ("dead_row_share_per_head", "share of all-zero rows (no gradient)"))
    panels += [(title, result[key]) for key, title in optional if result.get(key) is not None]
    if max(abs(v) for row in result["null_share_per_head"] for v in row) > NULL_SHOWN:
        panels.append(("attention on no token (1 - row sum)", result["null_share_per_head"]))
    return panels


def sink_heatmaps(result: dict[str, Any], path: Path) -> Path:
    """Heat maps layer x head (after Guo et al. 2024, Fig. 1): the mean attention share valid queries (without
    the first row) put on the first token and on delimiters, and the gate / exact-zero shares where they apply."""
    plt = _pyplot()
    panels = _head_panels(result)
    n_layers, n_heads = len(panels[0][1]), len(panels[0][1][0])
    # a panel grows with the heads up to a cap, and panels wrap into rows: 64 heads x 3 panels made a figure
    # 7,689 px wide that no screen shows whole
    width = min(MAX_FIGURE_WIDTH, max(4.0, 0.42 * n_heads + 1.6))
    height = max(2.6, 0.26 * n_layers + 1.4)
    columns = max(1, min(len(panels), int(MAX_FIGURE_WIDTH // width)))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    head_step = math.ceil(n_heads / MAX_HEAD_TICKS)
    for ax, (title, table) in zip(axes.flat, panels):
        values = torch.tensor(table)
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046)
        if values.numel() <= MAX_ANNOTATED_CELLS:
            for (row, col), value in zip(torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads)).tolist(),
                                         values.flatten().tolist()):
                ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        ax.set(title=title, xlabel="head", ylabel="layer")
        ax.set_xticks(range(0, n_heads, head_step))
        ax.set_yticks(range(n_layers))
        ax.tick_params(labelsize=7)
        ax.title.set_fontsize(9)
    dormant = result["dormant_share"]
    fig.suptitle(f"{result['model']}: where attention goes (numbers in %)\n"
                 f"{100 * dormant:.0f}% of heads put >= 50% on the first token", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def mechanism_ratios(result: dict[str, Any], path: Path) -> Path:
    """Per layer (after Guo et al. 2024, Fig. 3): the first token's value-vector norm and residual-stream norm and
    max |x| over the median token's (log scale; 1 = an ordinary token), and the mean attention share on it."""
    plt = _pyplot()
    layers = list(range(len(result["sink_share_per_layer"])))
    fig, (ratios, shares) = plt.subplots(1, 2, figsize=(12, 3.8))
    lines = (("value_drain_per_layer", "value norm ||v|| (mean of per-head ratios)", "tab:blue"),
             ("residual_peak_per_layer", "residual-stream L2 norm", "tab:red"),
             ("residual_peak_max_abs_per_layer", "residual-stream max |x|", "tab:orange"))
    for key, label, color in lines:
        ratios.plot(layers, result[key], marker="o", markersize=3, label=label, color=color)
    ratios.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ratios.set_yscale("log")
    ratios.set(title="first token over the median token", xlabel="layer (block output)", ylabel="ratio (log)")
    ratios.legend(fontsize=8)
    shares.plot(layers, result["sink_share_per_layer"], marker="o", markersize=3, label="first token")
    if result.get("delimiter_share_per_layer") is not None:
        shares.plot(layers, result["delimiter_share_per_layer"], marker="o", markersize=3, label="delimiters")
    shares.set(title="mean attention share (over heads)", xlabel="layer", ylabel="share", ylim=(0, 1))
    shares.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: value drain and first-token residual peak", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _mechanism_markdown(result: dict[str, Any]) -> list[str]:
    """The no-op mechanism: model numbers, then one row per layer (per-head means where the metric is per head)."""
    columns = [("first-token share", [f"{100 * v:.1f}%" for v in result["sink_share_per_layer"]])]
    per_head = (("delimiter share", "delimiter_share_per_head", "{:.1%}"),
                ("gates closed", "gate_closed_share_per_head", "{:.1%}"), ("gate mean", "gate_mean_per_head", "{:.3f}"),
                ("exact zeros", "clipped_zero_share_per_head", "{:.1%}"),
                ("all-zero rows", "dead_row_share_per_head", "{:.1%}"))
    for title, key, style in per_head:
        if result.get(key) is not None:
            columns.append((title, [style.format(sum(row) / len(row)) for row in result[key]]))
    columns += [("value drain", [f"{v:.3g}" for v in result["value_drain_per_layer"]]),
                ("residual peak (norm)", [f"{v:.3g}" for v in result["residual_peak_per_layer"]]),
                ("residual peak (max abs)", [f"{v:.3g}" for v in result["residual_peak_max_abs_per_layer"]])]
    return [
        "## No-op mechanism",
        "",
        "Attention shares are means over the valid queries except the first row; ratios are the first token's over "
        "the median token's (docs/analysis.md).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| sink share (max over layers of the mean first-token share) | {_percent(result['sink_share'])} |",
        f"| dormant heads (>= 50% on the first token) | {_percent(result['dormant_share'])} |",
        f"| dormant heads (>= 50% on the first token or delimiters) | "
        f"{_percent(result['dormant_share_with_delimiters'])} |",
        f"| value drain (max / min over layers) | {result['value_drain']:.3g} / {result['value_drain_min']:.3g} |",
        f"| residual peak, L2 norm (max over layers) | {result['residual_peak']:.3g} |",
        f"| residual peak, max abs (max over layers) | {result['residual_peak_max_abs']:.3g} |",
        *_alive_rows(result),
        "",
        "| layer | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        *(f"| {layer} | " + " | ".join(values[layer] for _, values in columns) + " |"
          for layer in range(len(result["sink_share_per_layer"]))),
        "",
    ]


def _alive_rows(result: dict[str, Any]) -> list[str]:
    """For kinds with exact zeros: the lowest layer's alive share and the layers that pass no gradient to q/k/v."""
    if result.get("alive_share") is None:
        return []
    dead = result["dead_layers"]
    return [f"| alive entries (min over layers; share of allowed entries above zero) | {_percent(result['alive_share'])} |",
            f"| dead layers (no entry above zero: no gradient into q, k, v) | "
            f"{', '.join(map(str, dead)) if dead else 'none'} |"]


def _paper_metric_rows(paper: dict[str, Any] | None) -> list[str]:
    """The official scripts' numbers (``analysis.paper_metrics``), labelled as such."""
    if paper is None:
        return []
    return [f"| paper metric ({paper['pooling']}, {paper['tensors']} tensors): {key.replace('_', ' ')} | {value:.2f} |"
            for key, value in paper.items() if isinstance(value, float)]


PAPER_METRICS_NOTE = (
    "The paper-metric rows pool as the official scripts do, so they are not our numbers computed again: each module "
    "output is viewed as one row per sample as the module returns it (OPT's FFN tensors are (B*T, d): single tokens), "
    "padding included, over more tensors (FFN outputs and LayerNorms too), with the unbiased std and a 1e-6 in the "
    "kurtosis. One outlier in a single-token row of width d gives a kurtosis near d, which is why the official avg "
    "kurtosis can be thousands where ours (block outputs, whole sequences without padding) is about ten. "
    "docs/analysis.md defines both.")


def _inputs_noun(family: str) -> str:
    """What the analysed inputs of a family are called: images for ViT, else sequences."""
    from quantizable.models import get_family
    from quantizable.tasks import Task

    return "images" if get_family(family).task is Task.IMAGE else "sequences"


def _register_rows(registers: dict[str, Any] | None) -> list[str]:
    if registers is None:
        return []
    return [f"| registers ({registers['count']} tokens, left out above): max inf-norm (block output, layer "
            f"{registers['max_inf_norm_layer']}) | {registers['max_inf_norm']:.2f} |",
            f"| registers: avg kurtosis (block output) | {registers['avg_kurtosis']:.2f} |"]


def _markdown(result: dict[str, Any]) -> str:
    outliers = result["outliers"]
    share = outliers["delimiter_share"]
    lines = [
        f"# Outlier analysis: {result['model']} ({result['family']})",
        "",
        f"{result['sequences']} {_inputs_noun(result['family'])}. Definitions: docs/analysis.md. Layers and heads "
        "are zero-based.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| max inf-norm (block output, layer {result['max_inf_norm_layer']}) | {result['max_inf_norm']:.2f} |",
        f"| avg kurtosis (block output) | {result['avg_kurtosis']:.2f} |",
        f"| max kurtosis (block output) | {result['max_kurtosis']:.2f} |",
        *(f"| max {key} inf-norm | {result[f'max_{key}_inf_norm']:.2f} |"
          for key in ("attn_out", "ffn_out", "ln_in") if f"max_{key}_inf_norm" in result),
        f"| outliers (> {outliers['threshold_std']:g} std, {outliers['tensor']}) | {outliers['total']} |",
        f"| delimiter share of outliers | {'n/a' if share is None else f'{100 * share:.1f}%'} |",
        *_register_rows(result.get("registers")),
        *_paper_metric_rows(result.get("paper_metrics")),
        "",
        *([PAPER_METRICS_NOTE, ""] if result.get("paper_metrics") else []),
        "Top outlier dimensions: " + (", ".join(f"#{d} ({c})" for d, c in outliers["dims"][:8]) or "none"),
        "",
        "Top outlier tokens: " + (", ".join(f"`{t}` ({c})" for t, c in outliers["tokens"][:8]) or "none"),
        "",
        *_mechanism_markdown(result),
        "## Per layer and tensor",
        "",
        "| layer | tensor | mean inf-norm | max inf-norm | mean kurtosis |",
        "|---|---|---|---|---|",
        *(f"| {r['layer']} | {r['tensor']} | {r['mean_inf_norm']:.2f} | {r['max_inf_norm']:.2f} | "
          f"{r['mean_kurtosis']:.2f} |" for r in result["per_layer"]),
        "",
        *(f"![{name}]({name})" for name in result.get("figures", [])),
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], data: FigureData, out_dir: Path, config) -> list[str]:
    """Write the figures, ``metrics.json`` and ``report.md`` into ``out_dir``; returns the figure file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer, head = result["figure_layer"], result["figure_head"]
    figures = [outlier_histograms(result, config.hidden_size, out_dir / "outliers.png")]
    if data.probs:
        figures.append(attention_heatmaps(data, layer, head, config.num_attention_heads,
                                          out_dir / f"attention_layer{layer}_head{head}.png"))
    if "pixel_values" in data.inputs and data.first_outliers:
        figures.append(vit_patch_grids(data, layer, head, out_dir / "vit_patches.png"))
    figures.append(sink_heatmaps(result, out_dir / "sink_share.png"))
    figures.append(mechanism_ratios(result, out_dir / "mechanism_ratios.png"))
    names = [f.name for f in figures]
    result = {**result, "figures": names}
    write_json_atomic(out_dir / "metrics.json", result)
    write_text_atomic(out_dir / "report.md", _markdown(result))
    return names
