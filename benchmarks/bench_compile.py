"""torch.compile of the whole model against eager: training-step time of vanilla, clipped and gated attention on CPU.

For bert-small and opt-small at T=128, each attention variant runs a training step (forward, backward, the trainer's
fused AdamW) eagerly and as ``torch.compile(model)`` (Inductor; the optimizer step stays eager). The fast paths run
as our custom ops (the C row kernels; ``compiled_fast_paths(True)``) or, with ``fused_attention(False)``, as the plain
reference ops that Inductor fuses itself (what compiling picks by default); that pair answers whether the
hand-written kernels still pay off under compile. All variants of a
model share weights and batch, their steps are interleaved round-robin (rotating the order every round) so a shared
machine's slow phases hit all alike, and the reported time is the median step of this process's CPU time on one
torch thread. Ratios are to eager vanilla SDPA of the same model, and compiled to eager of the same variant.

    python benchmarks/bench_compile.py                       # 8-25 min on 2 loaded cores, mostly compiling
    python benchmarks/bench_compile.py --presets opt-small   # one model: 8 min here (warm Inductor cache)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from quantizable.attention import AttentionSpec, spec_for_method
from quantizable.attention.switch import compiled_fast_paths, fused_attention
from quantizable.benchmarking import BenchmarkRun, interleaved_times, medians
from quantizable.models import apply_attention_spec, create_model
from quantizable.training.allocator import keep_freed_memory
from quantizable.training.config import OptimConfig
from quantizable.training.optim import make_optimizer

RESULTS = Path(__file__).parent / "results" / "compile.json"
PRESETS = ("bert-small", "opt-small")


@dataclass(frozen=True)
class Variant:
    name: str
    spec: AttentionSpec
    fused: bool = True  # False: the reference ops (fused_attention(False)), which Inductor fuses on its own

    def context(self) -> ContextManager:
        # the fast paths' custom ops also inside compiled graphs (by default compiling takes the reference ops)
        return compiled_fast_paths(True) if self.fused else fused_attention(False)


VARIANTS = (
    Variant("vanilla", spec_for_method("vanilla")),
    Variant("clipped_kernel", spec_for_method("clipped_softmax")),
    Variant("clipped_aten", spec_for_method("clipped_softmax"), fused=False),
    Variant("gated_kernel", spec_for_method("gated_attention", gate_type="linear")),
    Variant("gated_aten", spec_for_method("gated_attention", gate_type="linear"), fused=False),
)


def build(preset: str, seq_len: int, batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The preset's model (attention dropout off, as in bench_attention_cost) and a batch with one padded row."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dropout = {"attention_probs_dropout_prob": 0.0} if preset.startswith("bert") else {"attention_dropout": 0.0}
    base = create_model(preset, max_position_embeddings=seq_len, **dropout)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -seq_len // 4:] = 0
    return base, {"input_ids": ids, "attention_mask": mask, "labels": ids}


def make_step(model: torch.nn.Module, run: Callable, inputs: dict[str, torch.Tensor],
              variant: Variant) -> Callable[[], None]:
    optimizer = make_optimizer(model, OptimConfig())

    def step() -> None:
        with variant.context():
            run(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(preset: str, seq_len: int, batch: int, steps: int, warmup: int) -> list[dict]:
    base, inputs = build(preset, seq_len, batch)
    runs: dict[str, Callable[[], None]] = {}
    compile_s = {}
    for variant in VARIANTS:
        for mode in ("eager", "compiled"):
            model = apply_attention_spec(base, variant.spec).train()
            run = torch.compile(model) if mode == "compiled" else model
            name = f"{variant.name}/{mode}"
            runs[name] = make_step(model, run, inputs, variant)
            start = time.perf_counter()
            runs[name]()  # the first call compiles
            compile_s[name] = time.perf_counter() - start
            print(f"  {preset} {name}: first step {compile_s[name]:.1f} s", flush=True)
    names = list(runs)
    times = interleaved_times(runs, steps, warmup, clock=time.process_time)
    median = medians(times)
    rows = []
    for name in names:
        variant, mode = name.split("/")
        rows.append({"model": preset, "seq_len": seq_len, "batch": batch, "variant": variant, "mode": mode,
                     "step_ms": round(1000 * median[name], 2), "steps": len(times[name]),
                     "first_step_s": round(compile_s[name], 1),
                     "vs_eager_vanilla": round(median[name] / median["vanilla/eager"], 3),
                     "compiled_vs_eager": round(median[name] / median[f"{variant}/eager"], 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | eager x vanilla | compiled x vanilla | compiled / eager |", "|---|---|---:|---:|---:|"]
    for row in (r for r in rows if r["mode"] == "eager"):
        compiled = next(r for r in rows if r["model"] == row["model"] and r["variant"] == row["variant"]
                        and r["mode"] == "compiled")
        lines.append(f"| {row['model']} | {row['variant']} | {row['vs_eager_vanilla']:.3f} | "
                     f"{compiled['vs_eager_vanilla']:.3f} | {compiled['compiled_vs_eager']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=PRESETS)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch: batch = max(1, tokens // T)")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (every variant once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Every compiled model adds guards to the same transformers code objects: past dynamo's default limit of 8
    # entries per frame the later models would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    kept = keep_freed_memory()
    run = BenchmarkRun("compile", {"threads": args.threads, "steps": args.steps, "length": args.length,
                                   "tokens": args.tokens, "kept_freed_memory": kept,
                                   "clock": "process CPU time, median step"})
    rows = []
    for preset in args.presets:
        rows += measure(preset, args.length, max(1, args.tokens // args.length), args.steps, warmup=2)
    print(table(rows))
    result = run.write(args.out, rows)
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
