"""``quantizable reproduce``: the no-op mechanism on Bigram-Backcopy and the paper's comparison table, at the scale
of this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

# quantizable.attention.spec.KINDS (a test checks they agree), not imported: the parser is built for every verb and
# must stay light
KINDS = ("vanilla", "clipped_softmax", "gated_attention", "softmax_plus_one", "sink_token", "key_bias", "sigmoid",
         "softpick", "value_gate", "sink_logit")


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(name for name in text.split(",") if name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short trainings (minutes): the quick-start job")
    parser.add_argument("--scale", choices=("full", "quick", "tiny", "long", "long-tiny", "paper"),
                        help="full (default), quick, tiny (CI smoke), or long: Bigram-Backcopy at a constant "
                             "learning rate for 8,000 steps, six attention kinds, two seeds, every snapshot "
                             "quantized (about an hour on 2 cores; long-tiny is its smoke form)")
    parser.add_argument("--task", "--tasks", dest="tasks",
                        help="comma-separated: backcopy (the synthetic no-op task), pretrain (table 2); default: "
                             "every task of the scale (both, or backcopy at --scale long)")
    parser.add_argument("--families", help="comma-separated subset of each task's families (backcopy: opt; "
                                           "pretrain: bert,opt,vit; default: all, at --quick pretrain only vit)")
    parser.add_argument("--methods",
                        help=f"comma-separated attention kinds, of: {', '.join(KINDS)} (default "
                             "vanilla,clipped_softmax,gated_attention; at --scale long also softmax_plus_one,"
                             "sink_token,key_bias)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training override for every run, as in `train --set` (e.g. optim.lr=1e-2)")
    parser.add_argument("--train-seeds", type=int, help="use only the first N training seeds of the scale")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="runs trained at once, each in its own process (default: one per CPU core on a "
                             "CPU-only machine, one with a GPU)")
    parser.add_argument("--ptq", help="comma-separated PTQ baselines measured on every run as well: smoothquant[:ALPHA], "
                                      "rotation, per_token, outlier_fp[:K], prefix[:N] (docs/ptq-baselines.md)")
    parser.add_argument("--setup", default="default", choices=("default", "paper"),
                        help="quantization setup of every W8A8 number: default (ours) or paper (the official code's "
                             "placement, grid and range estimators; docs/quantization.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="--scale paper: print every run, its steps, tokens and estimated GPU-hours; read no data")
    parser.add_argument("--out", type=Path, required=True, help="output directory (finished runs are reused)")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable.experiments import reproduce
    from quantizable.experiments.reproduce import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scale = args.scale or ("quick" if args.quick else "full")
    methods, tasks = _names(args.methods), _names(args.tasks)
    if scale == "paper" or args.dry_run:
        return _paper(args, scale, methods)
    rows = reproduce(args.out, scale, _names(args.families), methods,
                     overrides=tuple(args.overrides), train_seeds=args.train_seeds, workers=args.workers,
                     tasks=tasks, ptq=_names(args.ptq) or (), setup=args.setup)
    for row in rows:
        print(f"{row['task']:8s} {row['family']:5s} {row['method']:16s} FP {row['fp']['mean']:8.2f}  "
              f"W8A8 {row['w8a8']['mean']:8.2f}  INT8 (ORT) {row['int8']['mean']:8.2f}  "
              f"inf-norm {row['max_inf_norm']['mean']:8.1f}  kurtosis {row['avg_kurtosis']['mean']:8.1f}"
              + (f"  registers' inf-norm {row['register_max_inf_norm']['mean']:8.1f}"
                 if row.get("register_max_inf_norm") else ""))
    print(f"report: {args.out / 'report.md'}")
    return 0


def _paper(args: argparse.Namespace, scale: str, methods: tuple[str, ...] | None) -> int:
    """The paper's recipes on GPUs (experiments.paper); its own path, the CPU scales' jobs do not apply."""
    from quantizable.experiments import paper

    if scale != "paper":
        raise SystemExit("--dry-run is only for --scale paper")
    if args.dry_run:
        print(paper.dry_run(methods or paper.METHODS, _names(args.families)))
        return 0
    for run_dir in paper.launch(args.out, methods or paper.METHODS, _names(args.families)):
        print(f"trained: {run_dir}; measure with: quantizable quantize {run_dir} --out {run_dir / 'w8a8'}")
    return 0
