"""``quantizable export MODEL_OR_RUN [--int8] [--backend onnxruntime|pt2e] --out DIR``: real INT8 inference, FP32 vs
INT8 quality and latency; ``--stock``: a vanilla model as the stock transformers architecture.

Calibration and validation batches come from the same datasets and collators as ``quantizable quantize`` (so the
numbers are comparable with the simulator): ``--calib-batches`` shuffled training batches drawn with ``--seed``,
and seeded-mask validation batches. Writes the backend's FP32 and INT8 models (``model.{fp32,int8}.onnx`` or
``.pt2``) and ``DIR/int8.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantizable.cli.errors import UserError
from quantizable.io import write_json_atomic

# quantizable.export.BACKENDS, not imported here: the parser is built for every verb and must stay light
BACKENDS = ("onnxruntime", "pt2e")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL_OR_RUN",
                        help="run directory, Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("--int8", action="store_true",
                        help="static per-tensor INT8 weights and activations (the default)")
    parser.add_argument("--stock", action="store_true",
                        help="instead: save a vanilla model as the stock transformers architecture (model_type opt, "
                             "bert, vit, ...; loads without quantizable) in --out")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="onnxruntime (default; QDQ via quantize_static) or pt2e (torchao X86InductorQuantizer, "
                             "torch.compile)")
    parser.add_argument("--calib-batches", type=int, default=16, help="calibration batches (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences or images per batch (default 8)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="validation batches to score (default: the whole validation split)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the run's data.seq_len, else 128)")
    parser.add_argument("--seed", type=int, default=0, help="calibration shuffling seed (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (ORT and PyTorch) for both models (default 1)")
    parser.add_argument("--no-compile", action="store_true",
                        help="pt2e: run the converted graph without torch.compile (INT8 numerics, not INT8 speed)")
    parser.add_argument("--no-simulate", action="store_true", help="skip the simulated W8A8 comparison number")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def _check(args: argparse.Namespace) -> None:
    if args.stock and args.int8:
        raise UserError("--stock and --int8 are two different exports; choose one")
    if args.no_compile and args.backend != "pt2e":
        raise UserError("--no-compile only applies to --backend pt2e")
    for name in ("calib_batches", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise UserError("--eval-batches must be at least 1")
    if not args.model.exists():
        raise UserError(f"{args.model} does not exist")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable.data import scoring_data
    from quantizable.evaluation import metric_unit
    from quantizable.export import export_int8
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config

    _check(args)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.stock:
        from quantizable.export.stock import export_stock

        print(f"wrote {export_stock(args.model, args.out)} (stock transformers architecture)")
        return 0
    model = load_checked_model(args.model)
    data = scoring_data(args.model, model, family_of_config(model.config).task, batch_size=args.batch_size,
                        calib_batches=args.calib_batches, eval_batches=args.eval_batches, seq_len=args.seq_len)

    print(f"exporting FP32 and INT8 ({args.backend}), calibrating on {args.calib_batches} batches, then scoring and "
          "timing both ...", flush=True)  # a minute or more, otherwise without a word
    result = export_int8(model, data.calibration(args.seed), data.evaluation, args.out, backend=args.backend, threads=args.threads,
                         simulate=not args.no_simulate, compile=not args.no_compile)
    result["model"] = str(args.model)
    write_json_atomic(args.out / "int8.json", result)
    fp32, int8, unit = result["fp32"], result["int8"], metric_unit(result["metric"])
    print(f"{result['metric']}: FP32 {fp32['metric']:.3f}{unit}, INT8 {int8['metric']:.3f}{unit}"
          + (f" (simulated W8A8 {result['simulated_w8a8']['metric']:.3f}{unit})" if "simulated_w8a8" in result
             else ""))
    print(f"latency ({args.threads} thread(s), median): FP32 {fp32['latency_ms']:.2f} ms, "
          f"INT8 {int8['latency_ms']:.2f} ms, speedup {result['speedup']:.2f}x")
    print(f"wrote {args.out / 'int8.json'}")
    return 0
