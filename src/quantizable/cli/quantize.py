"""``quantizable quantize MODEL_OR_RUN --out DIR``: simulated W8A8 (static ranges) vs floating point.

Per seed, ``--calib-batches`` batches are drawn at random (shuffled with that seed) from the training split to
estimate the ranges; FP and quantized models are then scored on the same validation batches (MLM masks are seeded,
so both see identical masks). ``--setup paper`` follows the paper's official code (``quantization.setups``): its
placement rules and grid, and its family's calibration recipe for every option not given explicitly. Writes
``DIR/results.json`` (with the setup and the recipe used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantizable.cli.errors import UserError
from quantizable.io import write_json_atomic

FLAGS = {"weight_bits": "--weights", "act_bits": "--acts", "act_estimator": "--estimator",
         "weight_estimator": "--weight-estimator"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL_OR_RUN",
                        help="run directory, Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("--weights", type=int, default=8, help="weight bits, 2..16 (default 8)")
    parser.add_argument("--acts", type=int, default=8, help="activation bits, 2..16 (default 8)")
    parser.add_argument("--setup", default="default", choices=("default", "paper"),
                        help="placement rules, grid and calibration recipe: default (ours) or paper (the official "
                             "code; docs/quantization.md lists every difference)")
    parser.add_argument("--estimator", default=None,
                        help="activation range estimator: running_minmax (default setup), current_minmax, "
                             "percentile:P (e.g. percentile:99.999) or mse")
    parser.add_argument("--weight-estimator", default=None,
                        help="weight range estimator: current_minmax (default setup), percentile:P or mse")
    parser.add_argument("--per-channel", action="store_true", help="per-output-channel weight ranges")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize the LM head / classifier")
    parser.add_argument("--calib-batches", type=int, default=None,
                        help="calibration batches per seed (default: the setup's recipe, 16; paper OPT: 4)")
    parser.add_argument("--seeds", type=int, default=3, help="number of calibration seeds 0..N-1 (default 3)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences or images per batch (default: the setup's recipe, 8; paper OPT: 1)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="validation batches to score (default: the whole validation split)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the run's data.seq_len, else 128; paper OPT: 512, "
                             "at most the model's positions)")
    parser.add_argument("--ptq", metavar="NAME",
                        help="also run a post-training-quantization baseline: smoothquant[:ALPHA], rotation, "
                             "per_token, outlier_fp[:K] or prefix[:N] (docs/ptq-baselines.md)")
    parser.add_argument("--attribute", choices=("kind", "site"), default=None,
                        help="also localise the damage: the score with only one kind of activation site (residual, "
                             "norm, linear, scores, probs, context, ...) or one single site quantized at a time, "
                             "weights in floating point, each group calibrated alone on the first seed's batches")
    parser.add_argument("--out", type=Path, required=True, help="output directory for results.json")


def _apply_recipe(args: argparse.Namespace, family: str, max_positions: int | None) -> dict:
    """Fill the options left unset from the setup's calibration recipe for this family; returns the recipe used.

    The recipe's sequence length (the paper's OPT: 512) never exceeds the length the run was trained at or the
    model's positions: a model trained at 64 tokens scored on 512-token blocks measures positions it never saw
    (backcopy at T = 64: FP perplexity 10.9 instead of 3.33), not quantization."""
    from quantizable.data.saved_model import run_data_settings
    from quantizable.quantization.setups import get_setup

    recipe = get_setup(args.setup).calibration_for(family)
    for option, value in (("estimator", recipe.act_estimator), ("weight_estimator", recipe.weight_estimator),
                          ("calib_batches", recipe.batches), ("batch_size", recipe.batch_size)):
        if getattr(args, option) is None:
            setattr(args, option, value)
    if args.seq_len is None and recipe.seq_len is not None:
        trained = run_data_settings(args.model).get("seq_len")
        args.seq_len = min(length for length in (recipe.seq_len, max_positions, trained) if length)
    return {"act_estimator": args.estimator, "weight_estimator": args.weight_estimator,
            "calib_batches": args.calib_batches, "batch_size": args.batch_size, "seq_len": args.seq_len}


def _config(args: argparse.Namespace):
    """The QuantConfig of the flags (estimators not given yet: the default setup's, for validation)."""
    from quantizable.quantization import QuantConfig

    try:
        return QuantConfig(weight_bits=args.weights, act_bits=args.acts,
                           weight_estimator=args.weight_estimator or "current_minmax",
                           act_estimator=args.estimator or "running_minmax", per_channel_weights=args.per_channel,
                           quantize_head=args.quantize_head, setup=args.setup)
    except ValueError as error:
        field = str(error).split(" ", 1)[0].rstrip(":")
        raise UserError(str(error).replace(field, FLAGS.get(field, field), 1)) from None


def _check(args: argparse.Namespace) -> None:
    for name in ("calib_batches", "seeds", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise UserError("--eval-batches must be at least 1")


def _print_attribution(attribution: dict, rows: int = 10) -> None:
    """The groups whose quantization alone costs most, worst first."""
    unit = "%" if attribution["metric"] == "perplexity" else " pts"
    print(f"{attribution['metric']}: FP {attribution['fp']:.4g}, all quantizers {attribution['full']:.4g} "
          f"({attribution['full_loss']:+.2f}{unit}); alone, worst first:")
    for row in attribution["rows"][:rows]:
        scale = "" if row["max_abs_range"] is None else f", range up to {row['max_abs_range']:.4g}"
        print(f"  {row['loss']:+8.2f}{unit}  {row['group']} ({row['sites']} site(s){scale})")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable.data import scoring_data
    from quantizable.evaluation import metric_unit
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config
    from quantizable.quantization import simulate_w8a8

    _check(args)
    _config(args)  # bad bits or estimators fail before the model is loaded
    ptq = None
    if args.ptq is not None:
        from quantizable.quantization.ptq import parse_ptq

        try:
            ptq = parse_ptq(args.ptq)
        except ValueError as error:
            raise UserError(f"--ptq: {error}") from None
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_checked_model(args.model)
    family = family_of_config(model.config)
    task = family.task
    recipe = _apply_recipe(args, family.name, getattr(model.config, "max_position_embeddings", None))
    config = _config(args)
    data = scoring_data(args.model, model, task, batch_size=args.batch_size, calib_batches=args.calib_batches,
                        eval_batches=args.eval_batches, seq_len=args.seq_len)
    calibration, evaluation = data.calibration, data.evaluation

    scored = "the whole validation split" if args.eval_batches is None else f"{args.eval_batches} validation batches"
    print(f"scoring FP, then W{args.weights}A{args.acts} for {args.seeds} calibration seed(s) of {args.calib_batches} "
          f"batches, each on {scored} ...", flush=True)  # minutes on a CPU, otherwise without a word
    results = simulate_w8a8(model, calibration, evaluation, config, seeds=range(args.seeds),
                            report=lambda line: print(f"  {line}", flush=True))
    if ptq is not None:
        from quantizable.quantization.calibration import fp_of
        from quantizable.quantization.ptq import NotApplicable, simulate_ptq

        try:  # the FP model was scored above
            results["ptq"] = simulate_ptq(model, calibration, evaluation, ptq, config, seeds=range(args.seeds),
                                          fp=fp_of(results))
        except NotApplicable as error:
            raise UserError(f"--ptq {ptq.name}: {error}") from None
    if args.attribute is not None:
        from quantizable.quantization.attribution import site_attribution

        print(f"attributing the loss to each {args.attribute} of activation quantizer ...", flush=True)
        results["attribution"] = site_attribution(model, calibration(0), evaluation, config, by=args.attribute,
                                                   report=lambda line: print(f"  {line}", flush=True))
        _print_attribution(results["attribution"])
    results["model"] = str(args.model)
    results["setup"] = {"name": args.setup, **recipe}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)  # an interrupted run leaves no half-written results
    q, unit = results["quantized"], metric_unit(results["metric"])

    def spread(stat: dict[str, float]) -> str:  # one calibration seed has no spread to print
        return f" ± {stat['std']:.3f}" if args.seeds > 1 else ""

    seeds = f"{args.seeds} seeds" if args.seeds > 1 else "1 seed"
    print(f"{results['metric']}: FP {results['fp']:.3f}{unit}, W{args.weights}A{args.acts} {q['mean']:.3f}{unit}"
          f"{spread(q)} over {seeds} ({results['sites']} activation quantizers, {args.setup} setup)")
    if ptq is not None:
        p = results["ptq"]["quantized"]
        print(f"{results['metric']}: W{args.weights}A{args.acts} + {ptq.name} {p['mean']:.3f}{unit}{spread(p)}")
    print(f"wrote {args.out / 'results.json'}")
    return 0
