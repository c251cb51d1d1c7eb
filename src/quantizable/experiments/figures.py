"""The figures of a reproduction's report: outliers per layer, metrics over training, quantization sensitivity and
the PTQ baselines, each drawn from ``results.json`` rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantizable.evaluation import degradation
from quantizable.experiments.display import family_name, method_name, pyplot

CURVE_METRICS = {  # metrics.jsonl key -> axis label, for the curves over training steps
    "sink_share": "attention on the first token (max layer)",
    "max_inf_norm": "max ‖block output‖∞",
    "avg_kurtosis": "avg. kurtosis",
    "residual_peak": "first-token residual norm / median",
}


def plot_per_layer(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for row in rows:
        layers = range(len(row["per_layer_inf_norm"]))  # zero-based, as in every report and analyze
        ax.plot(layers, row["per_layer_inf_norm"], marker="o", label=method_name(row["method"]))
    ax.set_xlabel("layer (zero-based)")
    ax.set_ylabel("mean ‖block output‖∞")
    ax.set_yscale("log")
    ax.set_title(f"{title}: outliers per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_curve(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric logged during training (``run.outlier_every``), from ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    points = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by an interruption
            continue
        if record.get(key) is not None:
            points.append((record["step"], record[key]))
    return points


def plot_training_curves(rows: list[dict[str, Any]], title: str, path: Path,
                         metrics: tuple[str, ...] = ("max_inf_norm", "avg_kurtosis")) -> Path | None:
    """Metrics over training steps (fixed validation batch), one line per method and training seed."""
    metrics = tuple(m for m in metrics if any(metric_curve(run, m) for row in rows for run in row["runs"]))
    if not metrics:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    colors: dict[str, str] = {}
    for row in rows:
        color = colors.setdefault(row["method"], f"C{len(colors)}")
        for index, run in enumerate(row["runs"]):
            for ax, metric in zip(axes[0], metrics):
                points = metric_curve(run, metric)
                ax.plot([p[0] for p in points], [p[1] for p in points], color=color, marker=".",
                        alpha=1.0 if index == 0 else 0.5,
                        label=method_name(row["method"]) if index == 0 else None)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("training step")
        ax.set_ylabel(CURVE_METRICS.get(metric, metric))
        if metric != "sink_share":
            ax.set_yscale("log")
    axes[0][0].legend()
    fig.suptitle(f"{title}: during training (fixed validation batch; faint: second seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Quantization loss vs bits per method: activation bits at 8-bit weights, weight bits at 8-bit activations."""
    from quantizable.experiments.measure import bit_widths
    from quantizable.experiments.plan import BIT_WIDTHS

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    panels = ((axes[0], "activation bits (weights 8)", lambda w, a: (w == 8, a)),
              (axes[1], "weight bits (activations 8)", lambda w, a: (a == 8, w)))
    for ax, label, select in panels:
        for index, row in enumerate(rows):
            points = []
            for name in BIT_WIDTHS:
                keep, bits = select(*bit_widths(name))
                if keep:
                    points.append((bits, degradation(row["fp"]["mean"], row["bits_sweep"][name], row["metric"])))
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{index}",
                    label=method_name(row["method"]))
        ax.set_xlabel(label)
        ax.invert_xaxis()
        ax.set_xticks(sorted({p for name in BIT_WIDTHS for p in bit_widths(name)}))
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(0.0, color="grey", linewidth=0.5)
    unit = "%" if rows[0]["metric"] == "perplexity" else "points"
    axes[0].set_ylabel(f"loss vs FP ({'perplexity +' if unit == '%' else 'accuracy -'}{unit})")
    axes[0].legend()
    fig.suptitle(f"{title}: simulated quantization sensitivity (static per-tensor ranges)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ptq(rows: list[dict[str, Any]], path: Path) -> Path:
    """W8A8 quality per model (task, family, method) and PTQ baseline, mean ± std, one panel per metric."""
    plt = pyplot()
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        group = [row for row in rows if row["metric"] == metric]
        names = ["FP", "W8A8", *dict.fromkeys(name for row in group for name in row["ptq"])]
        width = 0.8 / len(group)
        for index, row in enumerate(group):
            stats = [row["fp"], row["w8a8"],
                     *(row["ptq"].get(name, {}).get("w8a8", {"mean": float("nan"), "std": 0}) for name in names[2:])]
            ax.bar([i + index * width for i in range(len(names))], [s["mean"] for s in stats], width,
                   yerr=[s["std"] for s in stats], label=f"{family_name(row['family'])} {method_name(row['method'])}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel(metric)
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("W8A8 quality per model and PTQ baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
