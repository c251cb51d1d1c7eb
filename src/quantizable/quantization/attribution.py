"""Which quantizer breaks a model: the score with one activation site (or one kind of site) quantized at a time.

W8A8 of a whole model says how much quantization costs, not where. ``site_attribution`` evaluates the model with
weights in floating point and only one group of activation quantizers on, for every group: each site
(``by="site"``), each kind of site (``by="kind"``: residual sums, norm outputs, linear outputs, attention taps ...,
see ``quantization.placement``), plus the weights alone. Each group's ranges are calibrated with only that group
on, i.e. on floating-point inputs: with the whole model's calibration, a site downstream of a broken one would be
calibrated on already-destroyed values (a range of 0 after an outlier rounds everything else to zero) and take the
blame. The group whose quantization alone costs most is where the outlier that breaks the model sits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from quantizable.evaluation import degradation, evaluate
from quantizable.quantization.calibration import Batch, calibrate, freeze
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.placement import QuantizedModelHandle, quantize_

GROUPINGS = ("site", "kind")


def site_attribution(
    model: nn.Module,
    calib_batches: Iterable[Batch],
    eval_batches: Callable[[], Iterable[Batch]],
    config: QuantConfig | None = None,
    by: str = "kind",
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per group of activation sites, the metric with only that group quantized (weights in floating point, ranges
    calibrated on ``calib_batches`` with only that group on); rows sorted by the loss against floating point, worst
    first, with the group's largest range. ``full`` is the whole W8A8 model's score; ``report`` (e.g. ``print``)
    gets one line per group. The model is restored to floating point afterwards."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    config = config or QuantConfig()
    fp = evaluate(model, eval_batches())
    metric = fp["metric"]
    calib_batches = list(calib_batches)
    handle = quantize_(model, config)
    try:
        calibrate(model, calib_batches)
        freeze(model)
        full = evaluate(model, eval_batches())["value"]
        groups: dict[str, list[str]] = {}
        for key, kind in handle.site_kinds.items():
            groups.setdefault(key if by == "site" else kind, []).append(key)
        rows = []

        def score(label: str, weights: str, active: list[str]) -> None:
            handle.set_state(weights=weights, acts="off")
            _calibrate_alone(model, handle, active, calib_batches)
            value = evaluate(model, eval_batches())["value"]
            ranges = [float(max(abs(q.x_min.min()), abs(q.x_max.max())))
                      for q in (handle.act_quantizers[k] for k in active)]
            rows.append({"group": label, "sites": len(active), "value": value,
                         "loss": degradation(fp["value"], value, metric),
                         "max_abs_range": max(ranges) if ranges else None})
            if report is not None:
                unit = "%" if metric == "perplexity" else " pts"
                report(f"{label}: {metric} {value:.4g} ({rows[-1]['loss']:+.2f}{unit})")

        score("weights only", "frozen", [])
        for label, keys in groups.items():
            score(label, "off", keys)
    finally:
        handle.remove()
    rows.sort(key=lambda row: row["loss"], reverse=True)
    return {"metric": metric, "fp": fp["value"], "full": full, "full_loss": degradation(fp["value"], full, metric),
            "by": by, "config": config.to_dict(), "rows": rows}


@torch.no_grad()
def _calibrate_alone(model: nn.Module, handle: QuantizedModelHandle, keys: list[str], batches: list[Batch]) -> None:
    """Re-estimate the ranges of the activation quantizers ``keys`` with every other quantizer off, then freeze."""
    if not keys:
        return
    quantizers = [handle.act_quantizers[key] for key in keys]
    for quantizer in quantizers:
        quantizer.reset()
        quantizer.set_state("estimate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in batches:
        model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    model.train(was_training)
    for quantizer in quantizers:
        quantizer.set_state("frozen")
