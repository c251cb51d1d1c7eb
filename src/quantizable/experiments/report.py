"""``report.md`` of a reproduction: the paper's table 2 layout, per-layer plots, the vanilla run's outlier figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantizable.io import write_text_atomic

METHOD_NAMES = {"vanilla": "Vanilla", "clipped_softmax": "Clipped softmax", "gated_attention": "Gated attention"}


def _pm(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _degradation(row: dict[str, Any]) -> float:
    """W8A8 loss: relative perplexity increase (%) or absolute accuracy drop (points)."""
    fp, q = row["fp"]["mean"], row["w8a8"]["mean"]
    return 100.0 * (q - fp) / fp if row["metric"] == "perplexity" else fp - q


def plot_per_layer(rows: list[dict[str, Any]], family: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for row in rows:
        if row["family"] == family:
            layers = range(1, len(row["per_layer_inf_norm"]) + 1)
            ax.plot(layers, row["per_layer_inf_norm"], marker="o", label=METHOD_NAMES[row["method"]])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ‖block output‖∞")
    ax.set_yscale("log")
    ax.set_title(f"{family.upper()}: outliers per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[dict[str, Any]], scale: str) -> Path:
    lines = [
        f"# Reproduction of the paper's table 2 (scale: {scale})",
        "",
        "Metric: perplexity (lower is better) for BERT (masked LM) and OPT (causal LM), top-1 accuracy in % for ViT.",
        "FP is the floating-point model; W8A8 is the simulated post-training quantization (8-bit per-tensor weights,",
        "8-bit static per-tensor activations everywhere, running min-max ranges); mean ± std over training seeds",
        "(FP, outlier metrics) and over training x calibration seeds (W8A8). Max inf-norm and average kurtosis are",
        "those of `quantizable analyze` (block outputs, per sequence, averaged over the validation batches).",
        "",
        "| Family | Method | FP | Max inf. norm | Avg. kurtosis | W8A8 | W8A8 loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        unit = "%" if row["metric"] == "perplexity" else " pts"
        lines.append(
            f"| {row['family'].upper()} | {METHOD_NAMES[row['method']]} | {_pm(row['fp'])} | "
            f"{_pm(row['max_inf_norm'], 1)} | {_pm(row['avg_kurtosis'], 1)} | {_pm(row['w8a8'])} | "
            f"{_degradation(row):+.2f}{unit} |"
        )
    for family in dict.fromkeys(row["family"] for row in rows):
        plot = plot_per_layer(rows, family, out / f"per_layer_{family}.png")
        lines += ["", f"## {family.upper()}", "", f"![per-layer inf-norm]({plot.name})"]
        vanilla = next((r for r in rows if r["family"] == family and r["method"] == "vanilla"), None)
        if vanilla:
            figures = sorted(Path(vanilla["analysis_dir"]).glob("*.png"))
            if figures:
                lines += ["", "Outlier figures of the vanilla run (first training seed):", ""]
                lines += [f"![{f.stem}]({os.path.relpath(f, out)})" for f in figures]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
