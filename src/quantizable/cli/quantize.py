"""``quantizable quantize MODEL_OR_RUN --out DIR``: simulated W8A8 (static ranges) vs floating point.

Per seed, ``--calib-batches`` batches are drawn at random (shuffled with that seed) from the training split to
estimate the ranges; FP and quantized models are then scored on the same validation batches (MLM masks are seeded,
so both see identical masks). Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from quantizable.cli.errors import UserError
from quantizable.io import write_json_atomic

EVAL_MASK_SEED = 1234
FLAGS = {"weight_bits": "--weights", "act_bits": "--acts", "act_estimator": "--estimator",
         "weight_estimator": "--weight-estimator"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL_OR_RUN",
                        help="run directory, Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("--weights", type=int, default=8, help="weight bits, 2..16 (default 8)")
    parser.add_argument("--acts", type=int, default=8, help="activation bits, 2..16 (default 8)")
    parser.add_argument("--estimator", default="running_minmax",
                        help="activation range estimator: running_minmax (default), current_minmax, "
                             "percentile:P (e.g. percentile:99.999) or mse")
    parser.add_argument("--weight-estimator", default="current_minmax",
                        help="weight range estimator: current_minmax (default), percentile:P or mse")
    parser.add_argument("--per-channel", action="store_true", help="per-output-channel weight ranges")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize the LM head / classifier")
    parser.add_argument("--calib-batches", type=int, default=16, help="calibration batches per seed (default 16)")
    parser.add_argument("--seeds", type=int, default=3, help="number of calibration seeds 0..N-1 (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences or images per batch (default 8)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="validation batches to score (default: the whole validation split)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the run's data.seq_len, else 128)")
    parser.add_argument("--ptq", metavar="NAME",
                        help="also run a post-training-quantization baseline: smoothquant[:ALPHA], rotation, "
                             "per_token, outlier_fp[:K] or prefix[:N] (docs/ptq-baselines.md)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for results.json")


def _check(args: argparse.Namespace) -> None:
    for name in ("calib_batches", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise UserError("--eval-batches must be at least 1")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable.data import checkpoint_data, make_loader
    from quantizable.models import family_of_config, load_model
    from quantizable.quantization import QuantConfig, simulate_w8a8

    _check(args)
    ptq = None
    if args.ptq is not None:
        from quantizable.quantization.ptq import parse_ptq

        try:
            ptq = parse_ptq(args.ptq)
        except ValueError as error:
            raise UserError(f"--ptq: {error}") from None
    try:
        config = QuantConfig(weight_bits=args.weights, act_bits=args.acts, weight_estimator=args.weight_estimator,
                             act_estimator=args.estimator, per_channel_weights=args.per_channel,
                             quantize_head=args.quantize_head)
    except ValueError as error:
        field = str(error).split(" ", 1)[0].rstrip(":")
        raise UserError(str(error).replace(field, FLAGS.get(field, field), 1)) from None
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_model(args.model)
    task = family_of_config(model.config).task
    sets = checkpoint_data(args.model, model, task, args.seq_len)
    train, validation, collate = sets.train, sets.validation, sets.collate
    available = len(train) // args.batch_size
    if args.calib_batches > available:
        raise UserError(f"--calib-batches {args.calib_batches} exceeds the {available} full batches of "
                        f"{args.batch_size} in the training split")

    def calibration(seed: int) -> Iterable:
        loader = make_loader(train, args.batch_size, collate(seed), shuffle=True, seed=seed)
        return islice(loader, args.calib_batches)

    def evaluation() -> Iterable:
        loader = make_loader(validation, args.batch_size, collate(EVAL_MASK_SEED))
        return loader if args.eval_batches is None else islice(loader, args.eval_batches)

    results = simulate_w8a8(model, calibration, evaluation, config, seeds=range(args.seeds))
    if ptq is not None:
        from quantizable.quantization.ptq import check_applicable, simulate_ptq

        reason = check_applicable(model, ptq)
        if reason is not None:
            raise UserError(f"--ptq {ptq.name}: {reason}")
        results["ptq"] = simulate_ptq(model, calibration, evaluation, ptq, config, seeds=range(args.seeds))
    results["model"] = str(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)  # an interrupted run leaves no half-written results
    q = results["quantized"]
    print(f"{results['metric']}: FP {results['fp']:.3f}, W{args.weights}A{args.acts} {q['mean']:.3f} "
          f"± {q['std']:.3f} over {args.seeds} seeds ({results['sites']} activation quantizers)")
    if ptq is not None:
        p = results["ptq"]["quantized"]
        print(f"{results['metric']}: W{args.weights}A{args.acts} + {ptq.name} {p['mean']:.3f} ± {p['std']:.3f}")
    print(f"wrote {args.out / 'results.json'}")
    return 0
