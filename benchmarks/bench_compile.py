"""torch.compile of the whole model against eager: training-step time of vanilla, clipped and gated attention on CPU.

Default (issue 30): the trainer's step as ``run.compile=true`` runs it. For the CPU training presets ``bert-cpu``
and ``opt-cpu`` with the reproduction's attention settings (``experiments.plan.run_config`` at scale ``full``:
batch 16 of T=128 from the real data pipeline, dropout as in the preset), each of vanilla, clipped softmax and gated
attention takes a training step (forward, backward, gradient clipping, the preset's fused AdamW) eagerly and as
``torch.compile(model)`` (Inductor, what accelerate's dynamo plugin does; the optimizer step stays eager), each on
the paths the trainer takes: our C row kernels eagerly, the reference ops that Inductor fuses under compile; clipped
softmax also compiled with our kernels traced into the graph (``compiled_fast_paths(True)``, mode
``compiled_kernel``). The eager and compiled models of a method share weights, all share the batch; their steps are
interleaved round-robin (order rotated every round) and timed as this process's CPU time on one torch thread.
Ratios are the median per-round ratio (``paired_ratio``, with quartiles) to compiled vanilla, the issue's targets
being clipped <= 1.03 and gated <= 1.02. The first step (mostly compiling, into a fresh Inductor cache shared by the
run: the first compiled model pays for the kernels the others reuse) is a column of its own, wall time.
``--profile`` adds one profiled step per model: milliseconds per group of ops (``PROFILE_GROUPS``).

``--kernels``: the 2026-12-01 comparison (issue 16) of our custom ops traced into the compiled graph
(``compiled_fast_paths(True)``) against the reference ops Inductor fuses, on the model presets bert-small /
opt-small at batch 2 without dropout, ratios to eager vanilla (``results/compile.json``).

    python benchmarks/bench_compile.py --profile             # 6-8 min on 2 loaded cores, half of it compiling
    python benchmarks/bench_compile.py --presets opt-cpu     # one preset
    python benchmarks/bench_compile.py --kernels             # 8-25 min on 2 loaded cores, mostly compiling
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from quantizable.attention import AttentionSpec, spec_for_method
from quantizable.attention.switch import compiled_fast_paths, fused_attention
from quantizable.benchmarking import BenchmarkRun, interleaved_times, medians, paired_ratio
from quantizable.models import apply_attention_spec, create_model
from quantizable.training.allocator import keep_freed_memory
from quantizable.training.config import OptimConfig
from quantizable.training.optim import make_optimizer

RESULTS = Path(__file__).parent / "results" / "compile_train_step.json"
KERNEL_RESULTS = Path(__file__).parent / "results" / "compile.json"
TRAIN_PRESETS = ("bert-cpu", "opt-cpu")  # the trainer's CPU presets (issue 30)
PRESETS = ("bert-small", "opt-small")  # --kernels: model presets
METHODS = ("vanilla", "clipped_softmax", "gated_attention")
TARGETS = {"clipped_softmax": 1.03, "gated_attention": 1.02}  # compiled step over compiled vanilla (issue 30)
# compiled: Inductor fuses the reference ops (torch.export's and a GPU compile's path); compiled_kernel: our kernels
# traced into the graph (compiled_fast_paths(True)), what run.compile=true trains with on CPU
TRAIN_MODES = {method: ("eager", "compiled", "compiled_kernel") for method in ("clipped_softmax", "gated_attention")}


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
              context: Callable[[], ContextManager], optim: OptimConfig | None = None) -> Callable[[], None]:
    """One training step of ``model`` through ``run`` (the model or its compiled wrapper): forward and backward under
    ``context``, gradient clipping when ``optim.grad_clip`` (as the trainer), the optimizer step."""
    optim = optim or OptimConfig()
    optimizer = make_optimizer(model, optim)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with context():
            run(**inputs).loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def first_step(name: str, step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()  # the first call of a compiled model compiles
    seconds = time.perf_counter() - start
    print(f"  {name}: first step {seconds:.1f} s", flush=True)
    return seconds


# ---- default: the trainer's step on the CPU training presets (issue 30) ----

def train_setup(preset: str, method: str, batch: int,
                overrides: tuple[str, ...] = ()) -> tuple[torch.nn.Module, dict[str, torch.Tensor], OptimConfig]:
    """The model, optimizer settings and first training batch the reproduction (scale ``full``) trains ``method``
    with on ``preset`` (``bert-cpu`` -> family bert), at ``batch``, with ``overrides`` (``key=value``) on top."""
    from quantizable.data import make_loader
    from quantizable.data.tasks import task_data
    from quantizable.experiments.plan import SCALES, run_config
    from quantizable.models import family_of_config
    from quantizable.training.trainer import build_model

    family = preset.split("-")[0]
    config = run_config(family, method, 0, SCALES["full"], (f"run.batch_size={batch}", *overrides))
    if config.model.preset != load_model_preset(preset):
        raise ValueError(f"{preset}: the reproduction trains {config.model.preset}, not the preset's model")
    torch.manual_seed(0)
    model, tokenizer = build_model(config)
    data = task_data(config, family_of_config(model.config).task, tokenizer, model.config)
    inputs = next(iter(make_loader(data.train, batch, data.collate(0), shuffle=True, seed=0)))
    return model.train(), inputs, config.optim


def load_model_preset(preset: str) -> str:
    from quantizable.training.config import load_config

    return load_config(preset).model.preset


def measure_train(preset: str, batch: int, steps: int, warmup: int, overrides: tuple[str, ...] = (),
                  profile: bool = False) -> list[dict]:
    runs: dict[str, Callable[[], None]] = {}
    first_s: dict[str, float] = {}
    shapes = {}
    for method in METHODS:
        model, inputs, optim = train_setup(preset, method, batch, overrides)  # initialised as the trainer does
        shapes[method] = tuple(inputs["input_ids"].shape)
        for mode in TRAIN_MODES.get(method, ("eager", "compiled")):
            own = model if mode == "eager" else copy.deepcopy(model)
            name = f"{method}/{mode}"
            context = (lambda: compiled_fast_paths(True)) if mode == "compiled_kernel" else contextlib.nullcontext
            runs[name] = make_step(own, own if mode == "eager" else torch.compile(own), inputs, context, optim)
            first_s[name] = first_step(f"{preset} {name}", runs[name])
    times = interleaved_times(runs, steps, warmup, clock=time.process_time)
    median = medians(times)
    rows = []
    for name in runs:
        method, mode = name.split("/")
        row = {"preset": preset, "batch": shapes[method][0], "seq_len": shapes[method][1], "variant": method,
               "mode": mode, "step_ms": round(1000 * median[name], 1), "steps": len(times[name]),
               "first_step_s": round(first_s[name], 1)}
        for key, reference in (("vs_compiled_vanilla", "vanilla/compiled"), ("vs_eager_vanilla", "vanilla/eager"),
                               ("vs_eager", f"{method}/eager")):
            ratio = paired_ratio(times, name, reference)
            row[key] = round(ratio["median"], 3)
            row[f"{key}_iqr"] = [round(ratio["q1"], 3), round(ratio["q3"], 3)]
        if mode == "compiled" and method in TARGETS:
            row["target"] = TARGETS[method]
            row["target_met"] = row["vs_compiled_vanilla"] <= TARGETS[method]
        if profile:
            row["profile_ms"] = profile_step(runs[name])
        rows.append(row)
    return rows


# where a step's CPU time goes: torch.profiler's self times, grouped (first matching prefix wins; the compiled graph's
# self time is the Inductor-generated C++ kernels it runs inline, everything it hands to ATen is counted apart)
PROFILE_GROUPS = (("inductor_kernels", ("## Call CompiledFxGraph",)), ("linear_gemm", ("aten::mm", "aten::addmm")),
                  ("attention_matmul", ("aten::bmm", "aten::baddbmm")), ("sdpa", ("aten::_scaled_dot_product",)),
                  ("our_ops", ("quantizable::",)), ("dropout_rng", ("aten::bernoulli", "aten::native_dropout")))


def profile_step(step: Callable[[], None]) -> dict[str, float]:
    """Milliseconds of one step's CPU time per ``PROFILE_GROUPS`` group, the rest as ``other``, and ``total``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    groups = dict.fromkeys([name for name, _ in PROFILE_GROUPS] + ["other"], 0.0)
    for event in prof.key_averages():
        group = next((name for name, prefixes in PROFILE_GROUPS if event.key.startswith(prefixes)), "other")
        groups[group] += event.self_cpu_time_total / 1000
    return {**{k: round(v, 1) for k, v in groups.items()}, "total": round(sum(groups.values()), 1)}


def train_table(rows: list[dict]) -> str:
    lines = ["| preset | variant | mode | step ms | x compiled vanilla (IQR) | target | x eager vanilla | x own eager "
             "| first step s |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        target = "" if "target" not in row else \
            f"<= {row['target']:.2f}: {'met' if row['target_met'] else 'not met'}"
        low, high = row["vs_compiled_vanilla_iqr"]
        lines.append(f"| {row['preset']} | {row['variant']} | {row['mode']} | {row['step_ms']:.0f} | "
                     f"{row['vs_compiled_vanilla']:.3f} ({low:.3f}-{high:.3f}) | {target} | "
                     f"{row['vs_eager_vanilla']:.3f} | {row['vs_eager']:.3f} | {row['first_step_s']:.1f} |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    groups = list(rows[0]["profile_ms"])
    lines = [f"| preset | variant | mode | {' | '.join(groups)} |", "|---|---|---|" + "---:|" * len(groups)]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['variant']} | {row['mode']} | "
                     + " | ".join(f"{row['profile_ms'][g]:.0f}" for g in groups) + " |")
    return "\n".join(lines)


# ---- --kernels: our custom ops against Inductor's fusion of the reference ops (issue 16) ----

def measure_kernels(preset: str, seq_len: int, batch: int, steps: int, warmup: int) -> list[dict]:
    base, inputs = build(preset, seq_len, batch)
    runs: dict[str, Callable[[], None]] = {}
    compile_s = {}
    for variant in VARIANTS:
        for mode in ("eager", "compiled"):
            model = apply_attention_spec(base, variant.spec).train()
            run = torch.compile(model) if mode == "compiled" else model
            name = f"{variant.name}/{mode}"
            runs[name] = make_step(model, run, inputs, variant.context, OptimConfig(grad_clip=None))  # as measured
            compile_s[name] = first_step(f"{preset} {name}", runs[name])
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
    parser.add_argument("--kernels", action="store_true",
                        help="our custom ops vs the reference ops under compile on model presets (issue 16)")
    parser.add_argument("--presets", nargs="+", choices=TRAIN_PRESETS + PRESETS,
                        help=f"default {' '.join(TRAIN_PRESETS)} (--kernels: {' '.join(PRESETS)})")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (the reproduction's full scale)")
    parser.add_argument("--length", type=int, default=128, help="--kernels: T")
    parser.add_argument("--tokens", type=int, default=256,
                        help="--kernels: tokens per batch: batch = max(1, tokens // T)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds, every variant once per round "
                        "(default 12; --kernels 15)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training-config override for every model, e.g. model.overrides.hidden_dropout_prob=0")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one step of each model: ms per group of ops (profile_ms)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's usual cache (default: a fresh one, so first steps are cold compiles)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    presets = args.presets or (PRESETS if args.kernels else TRAIN_PRESETS)
    wrong = [p for p in presets if p not in (PRESETS if args.kernels else TRAIN_PRESETS)]
    if wrong:
        parser.error(f"{' '.join(wrong)}: {'--kernels takes model' if args.kernels else 'takes training'} presets")
    steps = args.steps or (15 if args.kernels else 12)
    out = args.out or (KERNEL_RESULTS if args.kernels else RESULTS)
    cache = None
    if not args.warm_cache and not args.kernels:
        cache = tempfile.mkdtemp(prefix="bench_compile_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when Inductor first compiles
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    torch.set_num_threads(args.threads)
    # Every compiled model adds guards to the same transformers code objects: past dynamo's default limit of 8
    # entries per frame the later models would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    kept = keep_freed_memory()
    settings = {"threads": args.threads, "steps": steps, "kept_freed_memory": kept,
                "clock": "process CPU time; ratios: median per-round ratio (paired_ratio)"}
    if args.kernels:
        settings.update(length=args.length, tokens=args.tokens, clock="process CPU time, median step")
    else:
        settings.update(presets=list(presets), batch=args.batch, overrides=args.set,
                        inductor_cache="fresh" if cache else "warm",
                        first_step="wall time of the first step (compiling, for compiled models)",
                        command="python benchmarks/bench_compile.py" + (
                            f" --presets {' '.join(presets)}" if args.presets else "") + (
                            f" --batch {args.batch}" if args.batch != 16 else "") + (
                            f" --steps {steps}" if args.steps else "") + (" --warm-cache" if args.warm_cache else "")
                        + (" --profile" if args.profile else "")
                        + "".join(f" --set {item}" for item in args.set))
    run = BenchmarkRun("compile" if args.kernels else "compile_train_step", settings)
    rows = []
    for preset in presets:
        if args.kernels:
            rows += measure_kernels(preset, args.length, max(1, args.tokens // args.length), steps, warmup=2)
        else:
            rows += measure_train(preset, args.batch, steps, warmup=2, overrides=tuple(args.set),
                                  profile=args.profile)
            run.write(out, rows)  # a complete file after every preset
    print(table(rows) if args.kernels else train_table(rows))
    if args.profile and not args.kernels:
        print(profile_table(rows))
    result = run.write(out, rows)
    print(f"wrote {out} ({result['wall_s']} s; load average {result['machine']['load_average']} -> "
          f"{result['machine']['load_average_after']}, flags {result['machine']['cpu_flags']})")


if __name__ == "__main__":
    main()
