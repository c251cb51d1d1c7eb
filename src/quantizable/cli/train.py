"""``quantizable train``: pre-train (or fine-tune with ``--init-from``) from a preset or YAML config.

Scale out with ``accelerate launch --num_processes N -m quantizable.cli.main train ...`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training preset name (bert-cpu, opt-tiny, opt-125m, ...) or a YAML file; "
                        "with --resume and no --config, RUN_DIR/config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 --set attention.kind=gated_attention")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--init-from", type=Path, help="fine-tune: our run dir, a Hugging Face checkpoint dir or .gguf")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps in total")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from quantizable.cli.errors import UserError
    from quantizable.training import TrainingDivergedError, load_config, train

    source = args.config
    if source is None:
        if not (args.resume and (args.out / "config.yaml").is_file()):
            raise UserError("--config is required (a preset name or a YAML file) unless resuming a run dir")
        source = args.out / "config.yaml"
    config = load_config(source, args.overrides)
    try:
        summary = train(config, args.out, resume=args.resume, init_from=args.init_from, stop_after=args.stop_after,
                        progress=not args.no_progress)
    except TrainingDivergedError as error:
        raise UserError(str(error)) from error
    if summary["process_index"] != 0:
        return 0
    evaluation = summary["eval"]
    where = f"{args.out / 'model'}" if summary["finished"] else f"checkpoint in {args.out / 'checkpoints'}"
    quality = f", {evaluation['metric']} {evaluation['value']:.4g}" if evaluation else ""
    print(f"step {summary['step']}{quality}; saved {where}")
    return 0
