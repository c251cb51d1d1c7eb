"""Measure what each rule of the ``paper`` quantization setup changes, one rule at a time, on trained runs.

    python scripts/setup_effects.py RUN_DIR [RUN_DIR ...] --out docs/results/setup_effects.json

For each run: W8A8 (and W8A4, where the differences grow) under ``default``, under ``default`` plus one rule of
the paper setup, and under ``paper`` (all rules and the family's range estimators), on the same calibration batches
(the quick scale's: 2 seeds) and the same evaluation batches. Prints a markdown table; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from quantizable.data.backcopy import backcopy_scores, is_backcopy
from quantizable.experiments.measure import load_run
from quantizable.experiments.plan import SCALES
from quantizable.experiments.reproduce import quiet_transformers
from quantizable.io import write_json_atomic
from quantizable.models import family_of_config
from quantizable.quantization import QuantConfig, simulate_w8a8
from quantizable.quantization.setups import SETUPS, get_setup

RULES = ("fuse_linear_activation", "partial_embedding_sum", "shared_residual", "unsigned_nonnegative_weights",
         "context_before_gate")


def variants(family: str) -> dict[str, QuantConfig]:
    """``default``, default + each paper rule that applies to the family, the paper estimators alone, ``paper``."""
    paper, default = get_setup("paper"), get_setup("default")
    configs = {"default": QuantConfig()}
    for rule in RULES:
        value = getattr(paper, rule)
        if rule == "context_before_gate" and family not in value:
            continue
        SETUPS[f"+{rule}"] = dataclasses.replace(default, name=f"+{rule}", **{rule: value})
        configs[f"+{rule}"] = QuantConfig(setup=f"+{rule}")
    recipe = paper.calibration_for(family)
    configs["+paper estimators"] = QuantConfig(weight_estimator=recipe.weight_estimator,
                                               act_estimator=recipe.act_estimator)
    configs["paper"] = QuantConfig(setup="paper", weight_estimator=recipe.weight_estimator,
                                   act_estimator=recipe.act_estimator)
    return configs


def measure(run_dir: Path, bits: tuple[int, ...]) -> dict:
    run = load_run(run_dir, SCALES["quick"])
    family = family_of_config(run.model.config).name
    score = (lambda model: backcopy_scores(model, run.eval_batches, run.source)) if is_backcopy(run.source) else None
    rows = {}
    for name, config in variants(family).items():
        for act_bits in bits:
            result = simulate_w8a8(run.model, run.calibration, run.eval_batches, dataclasses.replace(
                config, act_bits=act_bits), seeds=SCALES["quick"].calib_seeds, score=score)
            entry = {"fp": result["fp"], "quantized": result["quantized"]["mean"],
                     "std": result["quantized"]["std"], "sites": result["sites"]}
            if score is not None:
                per_seed = result["scores"]["per_seed"]
                entry["copy_accuracy"] = sum(s["copy_accuracy"] for s in per_seed) / len(per_seed)
            rows[f"{name} W8A{act_bits}"] = entry
            print(f"{run_dir.name} {name} W8A{act_bits}: {entry}", flush=True)
    return {"run": str(run_dir), "family": family, "metric": result["metric"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bits", default="8,4", help="activation bit widths (default 8,4)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    quiet_transformers()
    results = [measure(run, tuple(int(b) for b in args.bits.split(","))) for run in args.runs]
    write_json_atomic(args.out, results)
    for result in results:
        print(f"\n{result['run']} ({result['family']}, {result['metric']})\n")
        print("| setup | sites | " + " | ".join(f"W8A{b}" for b in args.bits.split(",")) + " |")
        names = dict.fromkeys(key.rsplit(" ", 1)[0] for key in result["rows"])
        for name in names:
            cells = [result["rows"][f"{name} W8A{b}"] for b in args.bits.split(",")]
            print(f"| {name} | {cells[0]['sites']} | " + " | ".join(
                f"{c['quantized']:.3f} ± {c['std']:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
