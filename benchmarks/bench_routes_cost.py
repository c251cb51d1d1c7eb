"""Training-step cost of the routes to W8A8 of issue 33, as ratios to a vanilla AdamW step, in one interleaved run.

The long Bigram-Backcopy model (``opt-backcopy``: 2-layer OPT, d = 128, T = 64, the task's 67-token vocabulary)
at the long scale's batch 8, each
route its own model from the same seed with the trainer's optimizer; a step is forward, backward and the optimizer
update. Routes: Muon vs AdamW, single-scale vs the family's norm, the full OSP setting (Muon + single-scale +
embedding projection), sink logit vs vanilla attention, and a QAT W8A8 step (the simulator's quantizers in the
forward, activation ranges calibrated then fixed) vs the FP step. One torch thread, this process's CPU time
(``benchmarking.interleaved_times``); machine flags and load before and after are in the result file.

Measured 2026-12-04 06:03 UTC (2 cores, AVX2 without bf16 units, load 0.9-1.2; results/routes_cost.json): per step
vanilla AdamW 27 ms; single-scale norm 1.02x, sink logit 1.05x, Muon 1.66x, OSP (Muon + single-scale + embedding
projection) 1.72x, QAT W8A8 1.95x. Muon orthogonalises in float32 on CPU (training.optim.Muon); with torch's
bfloat16 iteration, emulated on this CPU, Muon was 14x (earlier run of this benchmark, load 3-4). On so small a
model (d = 128, batch 8) the optimizer is a large share of the step; OSP reports about 2% at 1.4B parameters.

    python benchmarks/bench_routes_cost.py                  # ~1 min on 1 CPU thread
    python benchmarks/bench_routes_cost.py --seconds 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from quantizable.attention import spec_for_method
from quantizable.benchmarking import BenchmarkRun, interleaved_times, medians, paired_ratio
from quantizable.models import create_model
from quantizable.quantization import QuantConfig
from quantizable.training.config import OptimConfig
from quantizable.training.optim import make_optimizer
from quantizable.training.qat import prepare_qat

RESULTS = Path(__file__).parent / "results" / "routes_cost.json"
VOCAB = 67  # the Bigram-Backcopy tokenizer's size, which the trainer gives the model (not the preset's 50,272)
# route -> (attention kind, model-config settings, optimizer, QAT)
ROUTES: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "vanilla (AdamW)": ("vanilla", {}, "adamw", False),
    "Muon": ("vanilla", {}, "muon", False),
    "single-scale norm": ("vanilla", {"single_scale_norm": True}, "adamw", False),
    "OSP (Muon + single-scale + emb. proj.)": ("vanilla", {"single_scale_norm": True, "embedding_projection": True},
                                               "muon", False),
    "sink logit": ("sink_logit", {}, "adamw", False),
    "QAT W8A8": ("vanilla", {}, "adamw", True),
}


def make_step(route: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    kind, structure, optimizer_name, qat = ROUTES[route]
    torch.manual_seed(0)
    model = create_model("opt-backcopy", spec_for_method(kind), vocab_size=VOCAB, **structure).train()
    if qat:
        prepare_qat(model, QuantConfig(), [{k: v for k, v in batch.items() if k != "labels"}])
    optimizer = make_optimizer(model, OptimConfig(name=optimizer_name, lr=3e-3))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=5.0, help="at least this much CPU time on the baseline")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = BenchmarkRun("routes_cost", vars(args) | {"out": str(args.out)})
    ids = torch.randint(0, VOCAB, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {route: make_step(route, batch) for route in ROUTES}
    times = interleaved_times(steps, args.rounds, warmup=2, seconds=args.seconds, clock=time.process_time)
    base = "vanilla (AdamW)"
    step_ms = medians(times)
    rows = [{"route": route, "steps": len(times[route]), "step_ms": 1000 * step_ms[route],
             "ratio": paired_ratio(times, route, base)} for route in ROUTES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run.write(args.out, rows, baseline=base)
    print(f"{'route':42s} {'ms/step':>8s} {'x vanilla AdamW (q1-q3)':>26s}")
    for r in rows:
        q = r["ratio"]
        print(f"{r['route']:42s} {r['step_ms']:8.1f} {q['median']:8.2f} ({q['q1']:.2f}-{q['q3']:.2f})")


if __name__ == "__main__":
    main()
