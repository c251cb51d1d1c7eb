"""Real INT8 of a SmoothQuant-ed model (ONNX Runtime, static per-tensor QDQ) beside the plain model and the simulator.

    nice python benchmarks/ptq_int8.py MODEL_OR_RUN --out DIR [--alpha 0.5] [--calib-batches 4] [--eval-batches 4]
        [--batch-size 4] [--seq-len 128] [--threads 1]

For the plain model and for ``smooth_(model, calibration, alpha, fold=...)`` (pre-LN: ``1 / s`` folded into the norm
gains, so the exported graph is the plain graph with other weights; post-LN BERT: an explicit multiply before the
smoothed Linears), ``quantizable.export.export_int8`` (ONNX Runtime) measures FP32 and INT8 quality and latency on
the same batches, and the simulator gives its W8A8 number for the same model (head quantized, as ORT does;
``simulate_ptq`` with smoothquant for the smoothed model). Writes ``DIR/ptq_int8.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from quantizable.data import scoring_data
from quantizable.export import export_int8
from quantizable.io import write_json_atomic
from quantizable.models import family_of_config, load_model
from quantizable.quantization import QuantConfig, simulate_w8a8
from quantizable.quantization.ptq import SmoothQuant, simulate_ptq
from quantizable.quantization.transforms import smooth_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_model(args.model).eval()
    family = family_of_config(model.config)
    data = scoring_data(args.model, model, family.task, batch_size=args.batch_size,
                        calib_batches=args.calib_batches, eval_batches=args.eval_batches, seq_len=args.seq_len)
    calibration, evaluation = data.calibration(0), list(data.evaluation())
    head = QuantConfig(quantize_head=True)
    results: dict = {"model": str(args.model), "settings": {k: str(v) for k, v in vars(args).items()}}

    start = time.perf_counter()
    plain = export_int8(model, calibration, lambda: evaluation, args.out / "plain", threads=args.threads,
                        repeats=5, simulate=False)
    plain["simulated_w8a8"] = simulate_w8a8(model, calibration, evaluation, head)["quantized"]["mean"]
    results["plain"] = {**plain, "seconds": time.perf_counter() - start}
    print("plain", {k: plain[k] for k in ("fp32", "int8", "simulated_w8a8")}, flush=True)

    start = time.perf_counter()
    fold = family.name != "bert"  # pre-LN: the norms feed only the smoothed Linears
    smoothed = copy.deepcopy(model)
    details = smooth_(smoothed, calibration, args.alpha, fold=fold)
    sq = export_int8(smoothed, calibration, lambda: evaluation, args.out / "smoothquant", threads=args.threads,
                     repeats=5, simulate=False)
    sq["simulated_w8a8"] = simulate_ptq(model, calibration, evaluation, SmoothQuant(args.alpha),
                                        head)["quantized"]["mean"]
    results["smoothquant"] = {**sq, "alpha": args.alpha, "folded": fold, "groups": details["groups"],
                              "fp_relative_change": details["fp_relative_change"],
                              "seconds": time.perf_counter() - start}
    print("smoothquant", {k: sq[k] for k in ("fp32", "int8", "simulated_w8a8")}, flush=True)
    write_json_atomic(args.out / "ptq_int8.json", results)


if __name__ == "__main__":
    main()
