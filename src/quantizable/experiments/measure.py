"""Measuring one trained run: FP metric, outlier and no-op mechanism metrics, simulated W8A8 over calibration seeds
and the bit-width sweep, real INT8 and the PTQ baselines, all on the same evaluation batches."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantizable.data.backcopy import backcopy_bos_shares, backcopy_scores, is_backcopy
from quantizable.experiments.plan import BIT_WIDTHS, Scale
from quantizable.experiments.results import MECHANISM_KEYS, RunMeasurement
from quantizable.io import write_json_atomic
from quantizable.tasks import Task as ModelTask  # not the reproduction's Task (experiments.plan)
from quantizable.training.config import TrainConfig

MEASURE_VERSION = 7  # bump when measure() gains fields, so older measure.json files are measured again


@dataclass(frozen=True)
class RunData:
    """A trained run loaded once for all its measurements: the same model and batches for the simulator, the
    analysis and real INT8 (the simulator removes its quantizers when done)."""

    model: Any
    tokenizer: Any
    source: str | None  # the run's data.source
    eval_batches: list[dict[str, torch.Tensor]]
    calibration: Callable[[int], list[dict[str, torch.Tensor]]]  # calibration batches of a seed


def load_run(run_dir: Path, scale: Scale) -> RunData:
    """The model, tokenizer, evaluation batches and seeded calibration batches of a trained run, built by
    ``data.scoring_data`` as ``quantize`` builds them (at the run's batch size), so both verbs score a run alike."""
    from quantizable import data
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config

    config = TrainConfig.from_run(run_dir)
    model = load_checked_model(run_dir)
    task = family_of_config(model.config).task
    tokenizer = None if task == ModelTask.IMAGE else data.checkpoint_tokenizer(run_dir)
    batches = data.scoring_data(run_dir, model, task, batch_size=config.run.batch_size,
                                calib_batches=scale.calib_batches, eval_batches=scale.eval_batches)
    return RunData(model, tokenizer, config.data.source, list(batches.evaluation()), batches.calibration)


def bit_widths(name: str) -> tuple[int, int]:
    """``"W8A6"`` -> (8, 6)."""
    weights, _, acts = name.removeprefix("W").partition("A")
    return int(weights), int(acts)


def quant_base(model: Any, setup: str) -> Any:
    """The W8A8 ``QuantConfig`` of a setup for a model's family (placement rules, grid, range estimators)."""
    from quantizable.models import family_of_config
    from quantizable.quantization import QuantConfig
    from quantizable.quantization.setups import get_setup

    recipe = get_setup(setup).calibration_for(family_of_config(model.config).name)
    return QuantConfig(setup=setup, weight_estimator=recipe.weight_estimator, act_estimator=recipe.act_estimator)


def task_score(run: RunData) -> Callable[[Any], dict[str, float]] | None:
    """The task's own metrics beside the main one (backcopy: copy accuracy, bigram excess), or None."""
    if not is_backcopy(run.source):
        return None

    def score(model: Any) -> dict[str, float]:
        return backcopy_scores(model, run.eval_batches, run.source)
    return score


def measure(run: RunData, run_dir: Path, scale: Scale, setup: str = "default") -> RunMeasurement:
    """FP metric, outlier and no-op mechanism metrics, simulated W8A8 over the calibration seeds and the
    sensitivity sweep over ``BIT_WIDTHS`` of one trained run; the backcopy task also scores copy accuracy and
    bigram loss in FP and under W8A8. ``setup`` (``quantization.setups``) chooses the placement rules, grid and the
    family's range estimators; the calibration batches stay the scale's, so both setups see the same data."""
    from quantizable.analysis import analyze
    from quantizable.quantization import simulate_w8a8
    from quantizable.quantization.calibration import fp_of

    base = quant_base(run.model, setup)
    score = task_score(run)
    quant = simulate_w8a8(run.model, run.calibration, run.eval_batches, base, seeds=scale.calib_seeds, score=score)
    sweep = {"W8A8": quant["quantized"]["per_seed"]}
    fp = fp_of(quant)  # scored once, reused by every bit width
    for name in BIT_WIDTHS[1:]:
        weights, acts = bit_widths(name)
        swept = simulate_w8a8(run.model, run.calibration, run.eval_batches, seeds=scale.calib_seeds,
                              config=dataclasses.replace(base, weight_bits=weights, act_bits=acts), fp=fp)
        sweep[name] = swept["quantized"]["per_seed"]
    analysis = analyze(run.model, run.eval_batches[: scale.analysis_batches], tokenizer=run.tokenizer,
                       out_dir=run_dir / "analysis")
    return RunMeasurement(
        version=MEASURE_VERSION,
        setup=setup,
        estimators={"weights": base.weight_estimator, "activations": base.act_estimator},
        metric=quant["metric"],
        fp=quant["fp"],
        w8a8=quant["quantized"],
        sites=quant["sites"],
        bits_sweep=sweep,
        max_inf_norm=analysis["max_inf_norm"],
        avg_kurtosis=analysis["avg_kurtosis"],
        per_layer_inf_norm=[row["mean_inf_norm"] for row in analysis["per_layer"] if row["tensor"] == "block_out"],
        register_max_inf_norm=analysis["registers"]["max_inf_norm"] if analysis["registers"] else None,
        analysis_dir=str(run_dir / "analysis"),
        figures=analysis["figures"],
        # kinds with exact zeros (clipped softmax, softpick) add entries above zero, all-zero rows and dead layers;
        # the value drain's lowest layer is the drained end
        **{key: analysis.get(key) for key in (*MECHANISM_KEYS, *(f"{key}_per_layer" for key in MECHANISM_KEYS),
                                              "dormant_share", "value_drain_min", "alive_share",
                                              "alive_share_per_layer", "dead_row_share_per_layer", "dead_layers")},
        # at initialisation, from the trainer's step-0 record
        liveness_at_init=liveness_at_init(run_dir),
        **({"scores": quant["scores"],
            **backcopy_bos_shares(run.model, run.eval_batches[: scale.analysis_batches], run.source)}
           if score is not None else {}),
    )


def liveness_at_init(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's step-0 liveness record of a run (``training.monitor.attention_liveness``), or None."""
    try:
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None
    return {k: v for k, v in first.items() if k != "step"} if first.get("step") == 0 else None


def measure_int8(run: RunData, run_dir: Path, scale: Scale) -> dict[str, Any]:
    """Real INT8 (ONNX Runtime, static per tensor, one thread) of one trained run, calibrated on the first
    calibration seed's batches and scored on the same evaluation batches as ``measure``; ``DIR/int8.json`` of
    ``quantizable export`` under ``run_dir/int8``. ORT needs no compilation, which keeps it cheap."""
    from quantizable.export import export_int8

    result = export_int8(run.model, run.calibration(scale.calib_seeds[0]), lambda: run.eval_batches,
                         run_dir / "int8", repeats=5, simulate=False)
    write_json_atomic(run_dir / "int8" / "int8.json", result)
    return result


def measure_ptq(run: RunData, scale: Scale, names: tuple[str, ...]) -> dict[str, Any]:
    """W8A8 under each PTQ baseline (``quantization.ptq``) of one trained run, on the calibration seeds and
    evaluation batches of ``measure``; a method that does not apply records its reason. The FP model is scored
    once, by the first method that applies."""
    from quantizable.quantization.calibration import fp_of
    from quantizable.quantization.ptq import NotApplicable, parse_ptq, simulate_ptq

    results: dict[str, Any] = {}
    fp = None
    for name in names:
        ptq = parse_ptq(name)
        try:
            result = simulate_ptq(run.model, run.calibration, run.eval_batches, ptq, seeds=scale.calib_seeds, fp=fp)
        except NotApplicable as error:
            results[ptq.name] = {"not_applicable": str(error)}
            continue
        fp = fp_of(result)
        results[ptq.name] = {key: result[key] for key in ("fp", "quantized", "ptq", "cost")}
    return results
