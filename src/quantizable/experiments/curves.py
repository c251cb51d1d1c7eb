"""Quantization cost over training (``reproduce --scale long``): every weight snapshot of a run
(``run.snapshot_every``) scored in floating point and under simulated W8A8 / W8A6 / W8A4, so a method's 8-bit
cost is seen as it grows, not only at the end. Each snapshot's numbers are written to ``curve/step_N.json`` as
soon as they exist, so an interrupted measurement continues where it stopped."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantizable.evaluation import degradation
from quantizable.experiments.display import method_name, pyplot
from quantizable.io import write_json_atomic

CURVE_BITS = ("W8A8", "W8A6", "W8A4")
CURVE_VERSION = 2  # bump when a point gains fields, so older curve files are measured again
# the trainer's outlier log (``run.outlier_every``) read at each snapshot's step
LOGGED = ("max_inf_norm", "avg_kurtosis", "sink_share", "residual_peak")
SCORES = ("copy_accuracy", "bigram_excess")  # the task's own scores kept per point (backcopy)
Batches = list[dict[str, torch.Tensor]]


def measure_point(model: torch.nn.Module, calibration: Callable[[int], Batches], eval_batches: Batches,
                  base: Any, seeds: tuple[int, ...], score: Callable[[Any], dict[str, float]] | None) -> dict[str, Any]:
    """FP metric and the mean over calibration seeds of each of ``CURVE_BITS``; with ``score`` (a task's own
    metrics, e.g. backcopy copy accuracy) also that score in FP and under W8A8."""
    from quantizable.quantization import simulate_w8a8

    point: dict[str, Any] = {"version": CURVE_VERSION}
    fp = None
    for name in CURVE_BITS:
        weights, _, acts = name.removeprefix("W").partition("A")
        config = dataclasses.replace(base, weight_bits=int(weights), act_bits=int(acts))
        result = simulate_w8a8(model, calibration, eval_batches, config, seeds=seeds,
                               score=score if name == "W8A8" else None, fp=fp)
        fp = {"metric": result["metric"], "value": result["fp"]}  # scored once, reused by the other bit widths
        point.update(metric=result["metric"], fp=result["fp"])
        point[name] = statistics.fmean(result["quantized"]["per_seed"])
        if result.get("scores"):
            point["scores"] = {key: {"fp": result["scores"]["fp"][key],
                                     "W8A8": statistics.fmean(s[key] for s in result["scores"]["per_seed"])}
                               for key in SCORES if key in result["scores"]["fp"]}
    return point


def logged_at(run_dir: Path) -> dict[int, dict[str, float]]:
    """The trainer's logged outlier metrics of a run, by step."""
    path = run_dir / "metrics.jsonl"
    found: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by an interruption
            continue
        values = {key: record[key] for key in LOGGED if record.get(key) is not None}
        if values:
            found[record["step"]] = values
    return found


def measure_curve(run_dir: Path, measure: Callable[[torch.nn.Module], dict[str, Any]], name: str = "curve",
                  report: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """``measure`` (a snapshot's model -> a point) on every snapshot of a run, each cached in ``name/step_N.json``
    (one name per quantization setup), joined with the outlier metrics the trainer logged at that step."""
    from quantizable.integrity import load_checked_model
    from quantizable.training.artifacts import snapshots

    logged = logged_at(run_dir)
    points = []
    for step, path in snapshots(run_dir):
        cached = run_dir / name / f"step_{step}.json"
        point = json.loads(cached.read_text()) if cached.is_file() else None
        if point is None or point.get("version") != CURVE_VERSION:
            if report is not None:
                report(f"measuring the snapshot at step {step}")
            point = measure(load_checked_model(path))
            cached.parent.mkdir(exist_ok=True)
            write_json_atomic(cached, point)
        points.append({"step": step, **point, **logged.get(step, {})})
    return points


def cost(point: dict[str, Any], bits: str) -> float:
    """The quantization loss of one point at ``bits`` (relative perplexity increase in %, or accuracy points)."""
    return degradation(point["fp"], point[bits], point["metric"])


def aggregate_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per step that every training seed has: the mean and the per-seed values of the FP metric, the cost at each of
    ``CURVE_BITS``, the logged outlier metrics and the task's scores."""
    steps = sorted(set.intersection(*(set(p["step"] for p in curve) for curve in curves))) if curves else []
    rows = []
    for step in steps:
        points = [next(p for p in curve if p["step"] == step) for curve in curves]
        values: dict[str, list[float]] = {"fp": [p["fp"] for p in points]}
        for bits in CURVE_BITS:
            values[bits] = [p[bits] for p in points]
            values[f"{bits}_cost"] = [cost(p, bits) for p in points]
        for key in LOGGED:
            if all(key in p for p in points):
                values[key] = [p[key] for p in points]
        for key in points[0].get("scores", {}):
            for where in ("fp", "W8A8"):
                values[f"{key}_{where}"] = [p["scores"][key][where] for p in points]
        rows.append({"step": step, "metric": points[0]["metric"],
                     **{key: {"mean": statistics.fmean(v), "per_seed": v} for key, v in values.items()}})
    return rows


def plot_curves(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """FP metric, W8A8 and W8A4 cost and the largest activation over training steps: one colour per method, the
    mean over training seeds bold and each seed faint."""
    plt = pyplot()
    panels = [("fp", "FP perplexity", "log"), ("W8A8_cost", "W8A8 cost (% perplexity)", "symlog"),
              ("W8A4_cost", "W8A4 cost (% perplexity)", "symlog"), ("max_inf_norm", "max ‖activation‖∞", "log")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for index, row in enumerate(rows):
        color = f"C{index}"
        curve = row["curve"]
        steps = [point["step"] for point in curve]
        for ax, (key, label, scale) in zip(axes, panels):
            if not all(key in point for point in curve):
                continue
            ax.plot(steps, [point[key]["mean"] for point in curve], color=color, marker=".",
                    label=method_name(row["method"]))
            for seed in range(len(curve[0][key]["per_seed"])):
                ax.plot(steps, [point[key]["per_seed"][seed] for point in curve], color=color, alpha=0.3, lw=0.8)
            ax.set_yscale(scale, **({"linthresh": 1.0} if scale == "symlog" else {}))
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
    axes[1].axhline(1.0, color="grey", ls=":", lw=1)  # the 1% line the remedies must stay under
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: quality and quantization cost over training (bold: mean over seeds; faint: each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_section(out: Path, rows: list[dict[str, Any]], title: str, stem: str) -> list[str]:
    """The report's section: the figure, then per method the FP metric, the W8A8 / W8A4 cost and the largest
    activation at a few steps (mean over training seeds, the range over seeds in brackets for W8A8)."""
    rows = [row for row in rows if row.get("curve")]
    if not rows:
        return []
    figure = plot_curves(rows, title, out / f"curves_{stem}.png")
    steps = [point["step"] for point in rows[0]["curve"]]
    shown = sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[(3 * len(steps)) // 4], steps[-1]})
    calib = rows[0].get("calib_seeds")
    calibrated = f"the mean over {len(calib)} calibration seeds" if calib else "the calibration seeds' mean"
    lines = [f"## {title}: quantization cost over training", "",
             f"Every snapshot of every run scored in FP and under simulated W8A8 / W8A4 ({calibrated} of each",
             "snapshot); cost = relative perplexity increase. Mean over training seeds; W8A8 also as",
             "[lowest, highest] over seeds. Largest activation: the trainer's outlier log at that step.", "",
             f"![quantization cost over training]({figure.name})", "",
             "| Method | step | FP ppl | W8A8 cost % [seeds] | W8A4 cost % | max inf. norm |", "|---|---|---|---|---|---|"]
    for row in rows:
        for point in row["curve"]:
            if point["step"] not in shown:
                continue
            seeds = point["W8A8_cost"]["per_seed"]
            norm = point.get("max_inf_norm")
            norm_text = f"{norm['mean']:.0f}" if norm else "-"
            lines.append(f"| {method_name(row['method'])} | {point['step']} | {point['fp']['mean']:.3f} | "
                         f"{point['W8A8_cost']['mean']:+.2f} [{min(seeds):+.2f}, {max(seeds):+.2f}] | "
                         f"{point['W8A4_cost']['mean']:+.1f} | {norm_text} |")
    return lines
