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
    parser.add_argument("--out", type=Path, help="run directory (required unless listing)")
    parser.add_argument("--list-presets", action="store_true",
                        help="print the training presets (for --config) with what each is for, and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every config key (for --set and YAML files) with its default, and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --out from its last checkpoint, as it was started (only "
                             "run.eval_every/eval_batches/checkpoint_every/log_every/outlier_every/mixed_precision "
                             "may change; a finished run is refused)")
    parser.add_argument("--init-from", type=Path, help="fine-tune: our run dir, a Hugging Face checkpoint dir or .gguf")
    parser.add_argument("--qat", metavar="SETTING",
                        help="quantization-aware training, e.g. --qat w8a8 --init-from RUN: the W8A8 simulator's "
                             "quantizers in the forward (same as --set qat.setting=w8a8; docs/training.md)")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps in total")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_presets() -> None:
    # quantizable.training.config.PRESET_DIR, not imported: that would import torch for a listing of files
    for path in sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml")):
        comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
        print(f"{path.stem:20s} {comments[0] if comments else ''}")


def _print_keys() -> None:
    from quantizable.training.config import TrainConfig

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and value and prefix + key != "model.overrides":
                walk(value, f"{prefix}{key}.")
            else:
                print(f"{prefix}{key} = {value!r}")

    walk(TrainConfig().to_dict(), "")
    print("model.overrides.* = settings of the preset's transformers config (hidden_size, num_hidden_layers, ...)")


def run(args: argparse.Namespace) -> int:
    from quantizable.cli.errors import UserError

    if args.list_presets or args.list_keys:
        _print_presets() if args.list_presets else _print_keys()
        return 0
    if args.out is None:
        raise UserError("--out is required: the run directory (see quantizable train --help)")
    from quantizable.evaluation import metric_unit
    from quantizable.training import TrainingDivergedError, load_config, train

    source = args.config
    if source is None:
        if not (args.resume and (args.out / "config.yaml").is_file()):
            raise UserError("--config is required (a preset name or a YAML file) unless resuming a run dir")
        source = args.out / "config.yaml"
    overrides = [*args.overrides, *([f"qat.setting={args.qat}"] if args.qat else [])]
    config = load_config(source, overrides)
    try:
        summary = train(config, args.out, resume=args.resume, init_from=args.init_from, stop_after=args.stop_after,
                        progress=not args.no_progress)
    except TrainingDivergedError as error:
        raise UserError(str(error)) from error
    finally:
        # one training per launched process: leave the process group before exit. Without it a gloo rank sometimes
        # hung in its exit for good after a 2-process FSDP --stop-after run (1 of ~5 in tests/test_distributed.py)
        from accelerate import PartialState

        PartialState().destroy_process_group()
    if summary["process_index"] != 0:
        return 0
    evaluation = summary["eval"]
    where = f"{args.out / 'model'}" if summary["finished"] else f"checkpoint in {args.out / 'checkpoints'}"
    quality = ""
    if evaluation:
        quality = f", {evaluation['metric']} {evaluation['value']:.4g}{metric_unit(evaluation['metric'])}"
    print(f"step {summary['step']}{quality}; saved {where}")
    return 0
