"""Figures (matplotlib, Agg) and the ``metrics.json`` / ``report.md`` files of ``analyze``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantizable.io import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from quantizable.analysis.analyze import _Collector

MAX_TICK_LABELS = 48  # token names on heatmap axes only for short sequences


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


def _token_names(collector: _Collector, first_inputs: dict[str, torch.Tensor], seq: int, length: int) -> list[str]:
    ids = first_inputs.get("input_ids")
    if ids is None:
        return ["[CLS]"] + [str(p) for p in range(length - 1)]
    return [collector.labels.label(int(t))[0] for t in ids[seq, :length]]


def attention_heatmaps(collector: _Collector, first_inputs: dict[str, torch.Tensor], layer: int, head: int,
                       n_heads: int, path: Path) -> Path:
    """Paper Fig. 2: attention probabilities, value norms ``||v_j||`` and their product ``p_ij ||v_j||``."""
    plt = _pyplot()
    probs = collector.probs[layer][:, head]  # (S, T, T)
    value_norms = collector.value_norms[layer]  # (S, T, H_kv)
    kv_head = head // (n_heads // value_norms.shape[-1])
    mask = first_inputs.get("attention_mask")
    rows = probs.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.6 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 0.12, 1]})
    for s in range(rows):
        length = int(mask[s].sum()) if mask is not None else probs.shape[-1]
        p = probs[s, :length, :length]
        v = value_norms[s, :length, kv_head]
        panels = ((p, "attention probabilities"), (v[:, None], "||v||"), (p * v[None, :], "probabilities x ||v||"))
        names = _token_names(collector, first_inputs, s, length)
        for ax, (matrix, title) in zip(axes[s], panels):
            image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046 if matrix.shape[1] > 1 else 0.5)
            ax.set_title(f"sequence {s}: {title}")
            ax.set_xticks([])
            if length <= MAX_TICK_LABELS:
                ax.set_yticks(range(length), names, fontsize=6)
                if matrix.shape[1] > 1:
                    ax.set_xticks(range(length), names, fontsize=6, rotation=90)
    fig.suptitle(f"layer {layer}, head {head} (zero-based)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def vit_patch_grids(collector: _Collector, first_inputs: dict[str, torch.Tensor], layer: int, head: int,
                    path: Path) -> Path:
    """Paper Fig. 3: the image, outliers per patch in layer ``layer`` and the attention each patch receives in
    head ``head`` of the next layer (column sums of its probability matrix), and that matrix."""
    plt = _pyplot()
    attention_layer = min(layer + 1, max(collector.probs))
    outliers = collector.first_outliers[layer][1:].float()
    probs = collector.probs[attention_layer][0, head]
    received = probs.sum(0)[1:]
    side = math.isqrt(outliers.numel())
    image = first_inputs["pixel_values"][0]
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
    axes[3].set_title("attention probabilities (token 0 = [CLS])", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _markdown(result: dict[str, Any]) -> str:
    outliers = result["outliers"]
    share = outliers["delimiter_share"]
    lines = [
        f"# Outlier analysis: {result['model']} ({result['family']})",
        "",
        f"{result['sequences']} sequences. Definitions: docs/analysis.md. Layers and heads are zero-based.",
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
        "",
        "Top outlier dimensions: " + (", ".join(f"#{d} ({c})" for d, c in outliers["dims"][:8]) or "none"),
        "",
        "Top outlier tokens: " + (", ".join(f"`{t}` ({c})" for t, c in outliers["tokens"][:8]) or "none"),
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


def write_outputs(result: dict[str, Any], collector: _Collector, first_inputs: dict[str, torch.Tensor],
                  out_dir: Path, config) -> list[str]:
    """Write the figures, ``metrics.json`` and ``report.md`` into ``out_dir``; returns the figure file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer, head = result["figure_layer"], result["figure_head"]
    figures = [outlier_histograms(result, config.hidden_size, out_dir / "outliers.png")]
    if collector.probs:
        figures.append(attention_heatmaps(collector, first_inputs, layer, head, config.num_attention_heads,
                                          out_dir / f"attention_layer{layer}_head{head}.png"))
    if "pixel_values" in first_inputs and collector.first_outliers:
        figures.append(vit_patch_grids(collector, first_inputs, layer, head, out_dir / "vit_patches.png"))
    names = [f.name for f in figures]
    result = {**result, "figures": names}
    write_json_atomic(out_dir / "metrics.json", result)
    write_text_atomic(out_dir / "report.md", _markdown(result))
    return names
