"""One results row per (task, family, method): the measurements of its training seeds as mean ± std."""

from __future__ import annotations

import statistics
from typing import Any

from quantizable.experiments.curves import aggregate_curve
from quantizable.experiments.plan import BIT_WIDTHS, TASKS, Scale
from quantizable.experiments.results import MECHANISM_KEYS, ResultRow, RunMeasurement


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _layer_mean(runs: list[RunMeasurement], key: str) -> list[float] | None:
    lists = [getattr(r, key) for r in runs]
    if any(values is None for values in lists):
        return None
    return [statistics.fmean(v) for v in zip(*lists)]


def _optional_stat(runs: list[RunMeasurement], key: str) -> dict[str, float] | None:
    values = [getattr(r, key) for r in runs]
    return None if any(v is None for v in values) else _mean_std(values)


def aggregate(task: str, family: str, method: str, runs: list[RunMeasurement], scale: Scale) -> ResultRow:
    """One results row: mean ± std over training seeds (FP, outliers, mechanism) and over training x calibration
    seeds (W8A8, each bit width of the sweep)."""
    first = runs[0]
    row: dict[str, Any] = {
        "task": task, "family": family, "method": method, "metric": first.metric,
        "setup": first.setup, "estimators": first.estimators,
        "fp": _mean_std([r.fp for r in runs]),
        "w8a8": _mean_std([v for r in runs for v in r.w8a8["per_seed"]]),
        "int8": _mean_std([r.int8["int8"]["metric"] for r in runs]),
        "max_inf_norm": _mean_std([r.max_inf_norm for r in runs]),
        "avg_kurtosis": _mean_std([r.avg_kurtosis for r in runs]),
        "per_layer_inf_norm": _layer_mean(runs, "per_layer_inf_norm"),
        **{key: _optional_stat(runs, key) for key in (*MECHANISM_KEYS, "dormant_share", "value_drain_min")},
        **{f"{key}_per_layer": _layer_mean(runs, f"{key}_per_layer") for key in MECHANISM_KEYS},
        "bits_sweep": {name: statistics.fmean(v for r in runs for v in r.bits_sweep[name]) for name in BIT_WIDTHS},
        "bits_sweep_std": {name: _mean_std([v for r in runs for v in r.bits_sweep[name]])["std"]
                           for name in BIT_WIDTHS},
        "train_seeds": [r.seed for r in runs], "calib_seeds": list(scale.calib_seeds),
        "runs": [r.run_dir for r in runs], "analysis_dir": first.analysis_dir, "figures": first.figures,
    }
    if first.alive_share is not None:  # a kind with exact zeros: was attention alive?
        row["alive_share"] = _mean_std([r.alive_share for r in runs])
        row["alive_share_per_layer"] = _layer_mean(runs, "alive_share_per_layer")
        row["dead_layers"] = {r.run_dir: r.dead_layers for r in runs if r.dead_layers}
        row["dead_layers_at_init"] = {r.run_dir: r.liveness_at_init["dead_layers"] for r in runs
                                      if (r.liveness_at_init or {}).get("dead_layers")}
    if first.register_max_inf_norm is not None:  # ViT registers: did they take the high norms?
        row["register_max_inf_norm"] = _mean_std([r.register_max_inf_norm for r in runs])
    if first.ptq is not None:  # W8A8 under each PTQ baseline, over training x calibration seeds
        row["ptq"] = {name: entry if "not_applicable" in entry else
                      {"w8a8": _mean_std([v for r in runs for v in r.ptq[name]["quantized"]["per_seed"]]),
                       "cost": entry["cost"]}
                      for name, entry in first.ptq.items()}
    if first.scores is not None:  # the task's own metrics (backcopy: copy accuracy, bigram loss)
        row["scores"] = {
            name: {"fp": _mean_std([r.scores["fp"][name] for r in runs]),
                   "w8a8": _mean_std([s[name] for r in runs for s in r.scores["per_seed"]])}
            for name in first.scores["fp"]
        }
    for key in ("bos_share_copy", "bos_share_other"):  # backcopy: where copying and idle queries look
        if getattr(first, f"{key}_per_layer") is not None:
            row[f"{key}_per_layer"] = _layer_mean(runs, f"{key}_per_layer")
            row[key] = _mean_std([max(getattr(r, f"{key}_per_layer")) for r in runs])
    if first.curve is not None:  # the long scale: quality and quantization cost at every snapshot
        row["curve"] = aggregate_curve([r.curve for r in runs])
    if family in TASKS[task].floors:  # the FP quality below which a model has not learnt enough to judge
        metric, minimum = TASKS[task].floors[family]
        value = row["fp"]["mean"] if metric == row["metric"] else row["scores"][metric]["fp"]["mean"]
        row["floor"] = {"metric": metric, "minimum": minimum, "value": value, "met": value >= minimum}
    return ResultRow(**row)
