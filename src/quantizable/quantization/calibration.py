"""Static-range PTQ flow: ``calibrate`` (estimate ranges on a few batches), ``freeze``, ``simulate_w8a8``."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantizable.evaluation import evaluate
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.placement import handle_of, quantize_, site_table

Batch = dict[str, torch.Tensor]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Estimate every quantizer's range: weights once from the weights, activations over ``batches`` (each
    forward quantizes with the estimate so far, so later sites see quantized inputs). Returns the batch count."""
    handle = handle_of(model)
    handle.set_state(weights="estimate", acts="off")
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            module.weight  # noqa: B018  (evaluating the parametrization estimates the weight range)
    handle.set_state(weights="frozen", acts="estimate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    for batch in batches:
        model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        count += 1
    model.train(was_training)
    if count == 0 and handle.act_quantizers:
        raise ValueError("calibration needs at least one batch")
    return count


def freeze(model: nn.Module) -> None:
    """Fix every range (static quantization); raises if a site saw no data during calibration."""
    handle = handle_of(model)
    silent = [name for name, q in handle.act_quantizers.items() if not q.calibrated]
    if silent:
        raise RuntimeError(f"{len(silent)} activation quantizers saw no data during calibration, e.g. {silent[0]}")
    handle.set_state(weights="frozen", acts="frozen")


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values, as every simulation reports them."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def fp_of(result: dict[str, Any]) -> dict[str, Any]:
    """The floating-point score inside a ``simulate_w8a8`` / ``simulate_ptq`` result, as their ``fp`` argument
    takes it: one model on one set of evaluation batches is scored once, however many simulations follow."""
    return {"metric": result["metric"], "value": result["fp"]}


def simulate_w8a8(
    model: nn.Module,
    calib_batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    eval_batches: Callable[[], Iterable[Batch]] | Iterable[Batch],
    config: QuantConfig | None = None,
    seeds: Iterable[int] = (0,),
    score: Callable[[nn.Module], dict[str, float]] | None = None,
    report: Callable[[str], None] | None = None,
    fp: dict[str, Any] | None = None,
    method: Any = None,
) -> dict[str, Any]:
    """FP evaluation, then per seed: quantize, calibrate on ``calib_batches(seed)``, freeze, evaluate.

    ``calib_batches`` is a function of the seed (so each seed draws its own calibration data) or a fixed
    collection; ``eval_batches`` a function returning fresh batches or a re-iterable collection. ``score`` (model ->
    named numbers) is a task's own metric, measured like the main one under ``"scores"`` (``fp``, ``per_seed``).
    ``report`` (e.g. ``print``) gets one line after the FP score and after each seed, for long CPU runs. ``fp``
    (``evaluate``'s result for this model on these evaluation batches) skips scoring the FP model again when one
    model is simulated at several bit widths. ``method`` (a ``quantization.ptq.PTQMethod``) transforms the model
    on each seed's calibration batches and configures the quantizers before calibration (its ``details`` are
    returned). The model is restored to floating point afterwards.
    """
    config = config or QuantConfig()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")

    def fresh_eval() -> Iterable[Batch]:
        return eval_batches() if callable(eval_batches) else eval_batches

    fp = fp if fp is not None else evaluate(model, fresh_eval())
    if report is not None:
        report(f"FP {fp['metric']} {fp['value']:.3f}")
    scores: dict[str, Any] = {"fp": score(model), "per_seed": []} if score is not None else {}
    per_seed, table, sites, details = [], [], 0, {}
    for seed in seeds:
        torch.manual_seed(seed)
        calibration = list(calib_batches(seed) if callable(calib_batches) else calib_batches)
        target, details = method.prepare(model, calibration, seed) if method is not None else (model, {})
        handle = quantize_(target, config)
        try:
            if method is not None:
                details = {**details, **method.configure(handle, calibration, details)}
            calibrate(target, calibration)
            freeze(target)
            per_seed.append(evaluate(target, fresh_eval())["value"])
            if score is not None:
                scores["per_seed"].append(score(target))
            table, sites = site_table(target), len(handle.act_quantizers)
            if report is not None:
                report(f"seed {seed} ({len(per_seed)}/{len(seeds)}): {fp['metric']} {per_seed[-1]:.3f}")
        finally:
            handle.remove()
    return {
        "metric": fp["metric"],
        "fp": fp["value"],
        "quantized": summarise(per_seed),
        "seeds": seeds,
        "sites": sites,
        "weight_sites": sum(row["kind"] == "weight" for row in table),
        "config": config.to_dict(),
        "site_table": table,
        **({"scores": scores} if score is not None else {}),
        **({"details": details} if method is not None else {}),
    }
