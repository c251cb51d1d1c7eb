"""``report.md`` of a reproduction: the paper's table 2 layout, per-layer plots, the vanilla run's outlier figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantizable.io import write_text_atomic

METHOD_NAMES = {"vanilla": "Vanilla", "clipped_softmax": "Clipped softmax", "gated_attention": "Gated attention"}
FAMILY_NAMES = {"bert": "BERT", "opt": "OPT", "vit": "ViT"}


def _pm(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _degradation(row: dict[str, Any], key: str = "w8a8") -> float:
    """Quantization loss (``key``: simulated ``w8a8`` or real ``int8``): relative perplexity increase (%) or
    absolute accuracy drop (points)."""
    fp, q = row["fp"]["mean"], row[key]["mean"]
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
    ax.set_title(f"{FAMILY_NAMES[family]}: outliers per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def outlier_curve(run_dir: str | Path) -> list[tuple[int, float, float]]:
    """(step, max inf-norm, avg kurtosis) logged during training (``run.outlier_every``), from ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    points = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by an interruption
            continue
        if "max_inf_norm" in record:
            points.append((record["step"], record["max_inf_norm"], record["avg_kurtosis"]))
    return points


def plot_training_curves(rows: list[dict[str, Any]], family: str, path: Path) -> Path | None:
    """Max inf-norm and kurtosis over training steps, one line per method and training seed."""
    curves = [(row, outlier_curve(run)) for row in rows if row["family"] == family for run in row["runs"]]
    curves = [(row, points) for row, points in curves if points]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    colors: dict[str, str] = {}
    for row, points in curves:
        new = row["method"] not in colors
        color = colors.setdefault(row["method"], f"C{len(colors)}")
        label = METHOD_NAMES[row["method"]] if new else None
        steps = [p[0] for p in points]
        axes[0].plot(steps, [p[1] for p in points], color=color, marker=".", label=label)
        axes[1].plot(steps, [p[2] for p in points], color=color, marker=".")
    for ax, name in zip(axes, ("max ‖block output‖∞", "avg. kurtosis")):
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"{FAMILY_NAMES[family]}: outliers during training (fixed validation batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[dict[str, Any]], scale: str, overrides: tuple[str, ...] = ()) -> Path:
    lines = [
        f"# Reproduction of the paper's table 2 (scale: {scale})",
        "",
        *([f"Training overrides on top of the scale: `{' '.join(overrides)}`", ""] if overrides else []),
        "Metric: perplexity (lower is better) for BERT (masked LM) and OPT (causal LM), top-1 accuracy in % for ViT.",
        "FP is the floating-point model; W8A8 is the simulated post-training quantization (8-bit per-tensor weights,",
        "8-bit static per-tensor activations everywhere, running min-max ranges); mean ± std over training seeds",
        "(FP, outlier metrics) and over training x calibration seeds (W8A8). Max inf-norm and average kurtosis are",
        "those of `quantizable analyze` (block outputs, per sequence, averaged over the validation batches).",
        "INT8 (ORT) is real INT8 inference: ONNX Runtime static per-tensor QDQ (`quantizable export --int8`),",
        "calibrated on the first calibration seed's batches, scored on the same validation batches (mean ± std over",
        "training seeds); its loss is relative to FP like W8A8's.",
        "",
        "| Family | Method | FP | Max inf. norm | Avg. kurtosis | W8A8 | W8A8 loss | INT8 (ORT) | INT8 loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        unit = "%" if row["metric"] == "perplexity" else " pts"
        lines.append(
            f"| {FAMILY_NAMES[row['family']]} | {METHOD_NAMES[row['method']]} | {_pm(row['fp'])} | "
            f"{_pm(row['max_inf_norm'], 1)} | {_pm(row['avg_kurtosis'], 1)} | {_pm(row['w8a8'])} | "
            f"{_degradation(row):+.2f}{unit} | {_pm(row['int8'])} | {_degradation(row, 'int8'):+.2f}{unit} |"
        )
    for family in dict.fromkeys(row["family"] for row in rows):
        plot = plot_per_layer(rows, family, out / f"per_layer_{family}.png")
        lines += ["", f"## {FAMILY_NAMES[family]}", "", f"![per-layer inf-norm]({plot.name})"]
        curves = plot_training_curves(rows, family, out / f"training_{family}.png")
        if curves:
            lines += ["", f"![outliers during training]({curves.name})"]
        vanilla = next((r for r in rows if r["family"] == family and r["method"] == "vanilla"), None)
        if vanilla:
            figures = sorted(Path(vanilla["analysis_dir"]).glob("*.png"))
            if figures:
                lines += ["", "Outlier figures of the vanilla run (first training seed):", ""]
                lines += [f"![{f.stem}]({os.path.relpath(f, out)})" for f in figures]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
