"""PTQ baselines on one model: FP, plain W8A8 and W8A8 under each PTQ method, mean ± std over calibration seeds.

    nice python benchmarks/ptq_baselines.py MODEL_OR_RUN --out DIR [--methods smoothquant,rotation,...]
        [--calib-batches 4] [--eval-batches 4] [--batch-size 4] [--seq-len 128] [--seeds 2]

``--embedding-fidelity`` (encoders without a trained MLM head, e.g. the MiniLM sentence encoder, whose
perplexity comes from a random head) adds ``cosine``: the mean cosine similarity of each sequence's mean-pooled
last hidden state (sentence-transformers' pooling) to the FP model's, on the evaluation batches.

The data are those of ``quantizable quantize`` (the checkpoint's run data, else the embedded corpus); the model is
loaded once for all methods. Writes ``DIR/ptq.json`` (plain ``w8a8`` and one entry per method, each with its wall
time); a method that does not apply to the model (rotation on post-LN BERT) is recorded with its reason.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantizable.data import scoring_data
from quantizable.io import write_json_atomic
from quantizable.models import family_of_config, load_model
from quantizable.quantization import QuantConfig, simulate_w8a8
from quantizable.quantization.calibration import fp_of
from quantizable.quantization.ptq import METHODS, NotApplicable, parse_ptq, simulate_ptq


def _pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def embedding_fidelity(model: torch.nn.Module, batches: list) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A score: mean cosine of mean-pooled last hidden states to the FP model's (1.0 for the FP model)."""
    model.eval()
    with torch.no_grad():
        reference = [_pooled(model, batch) for batch in batches]

    def score(candidate: torch.nn.Module) -> dict[str, float]:
        candidate.eval()
        with torch.no_grad():
            cosines = [torch.nn.functional.cosine_similarity(_pooled(candidate, b), r, dim=-1)
                       for b, r in zip(batches, reference)]
        return {"cosine": float(torch.cat(cosines).mean())}

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--embedding-fidelity", action="store_true")
    args = parser.parse_args()
    methods = [parse_ptq(name) for name in args.methods.split(",") if name]
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_model(args.model, new_weights=args.embedding_fidelity)  # the encoder without its MLM head
    data = scoring_data(args.model, model, family_of_config(model.config).task, batch_size=args.batch_size,
                        calib_batches=args.calib_batches, eval_batches=args.eval_batches, seq_len=args.seq_len)
    calibration, eval_batches = data.calibration, list(data.evaluation())
    seeds = range(args.seeds)
    score = embedding_fidelity(model, eval_batches) if args.embedding_fidelity else None
    start = time.perf_counter()
    plain = simulate_w8a8(model, calibration, eval_batches, QuantConfig(), seeds=seeds, score=score)
    plain.pop("site_table")
    results = {"model": str(args.model), "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
               "metric": plain["metric"], "fp": plain["fp"], "w8a8": {**plain, "seconds": time.perf_counter() - start},
               "ptq": {}}
    print(f"{plain['metric']}: FP {plain['fp']:.3f}, W8A8 {plain['quantized']['mean']:.3f} "
          f"± {plain['quantized']['std']:.3f} {plain.get('scores', '')}", flush=True)
    for ptq in methods:
        start = time.perf_counter()
        try:
            result = simulate_ptq(model, calibration, eval_batches, ptq, seeds=seeds, score=score, fp=fp_of(plain))
        except NotApplicable as error:
            results["ptq"][ptq.name] = {"not_applicable": str(error)}
            print(f"{ptq.name}: not applicable ({error})", flush=True)
            continue
        results["ptq"][ptq.name] = {**result, "seconds": time.perf_counter() - start}
        q = result["quantized"]
        print(f"{ptq.name}: W8A8 {q['mean']:.3f} ± {q['std']:.3f} {result.get('scores', '')} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "ptq.json", json.loads(json.dumps(results, default=str)))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "ptq.json", json.loads(json.dumps(results, default=str)))


if __name__ == "__main__":
    main()
