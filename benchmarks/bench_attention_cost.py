"""Cost of each attention variant: training-step time and peak memory, as ratios to vanilla attention on SDPA.

One run measures, for small BERT / OPT / ViT models at two sequence lengths, a full training step (forward,
backward, AdamW step) of: vanilla on SDPA, vanilla on transformers' eager attention, clipped softmax on the reference
ops and on the fused fast path (with its C row kernel, and with its ATen ops), and gated attention with each gate
type. All variants of one (model, length) group share the same weights and batch, and their steps are interleaved
round-robin (rotating the order every round), so slow phases of a shared machine hit all variants alike; the
reported time is the median step (``--seconds`` adds rounds until the baseline's steps add up to that much). On
CPU the clock is this process's CPU time (one torch thread), which other processes' load hardly changes; on CUDA
wall time. As in the trainer, glibc keeps freed memory (``--allocator default`` to measure without), so that steps
do not pay page faults for buffers the previous step freed, and AdamW is the trainer's fused one.

Memory: on CUDA the peak allocated during one step above the allocation before it. On CPU the peak resident set
of one step above the resident set before it (glibc's free memory is trimmed first and Linux's high-water mark is
reset through /proc/self/clear_refs), plus the bytes autograd saves for backward (deterministic, shared storages
counted once). Attention-probability dropout is set to 0 so that SDPA can use its fused kernel.

    python benchmarks/bench_attention_cost.py                        # ~4 min on 1 CPU thread
    python benchmarks/bench_attention_cost.py --steps 24 --seconds 6 # ~8 min: the run in docs/performance.md
    python benchmarks/bench_attention_cost.py --quick                # ~1 min: T=128 only, fewer steps
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from transformers import PreTrainedModel

from quantizable.attention import AttentionGate, AttentionSpec, spec_for_method, use_cpu_kernel
from quantizable.attention.interface import fused_attention, quantizable_attention_forward
from quantizable.benchmarking import BenchmarkRun, interleaved_times
from quantizable.models import apply_attention_spec, create_model
from quantizable.training.allocator import keep_freed_memory
from quantizable.training.config import OptimConfig
from quantizable.training.optim import make_optimizer

RESULTS = Path(__file__).parent / "results" / "attention_cost.json"
BASELINE = "vanilla_sdpa"


@dataclass(frozen=True)
class Variant:
    name: str
    spec: AttentionSpec
    attn_implementation: str | None = None  # None: keep the quantizable implementation
    fused: bool = True
    kernel: bool = True  # the fast path's C row kernel (False: its ATen ops)

    def context(self) -> ContextManager:
        if not self.fused:
            return fused_attention(False)
        return nullcontext() if self.kernel else use_cpu_kernel(False)


VARIANTS = (
    Variant(BASELINE, spec_for_method("vanilla")),
    Variant("vanilla_eager", spec_for_method("vanilla"), attn_implementation="eager"),
    Variant("clipped_reference", spec_for_method("clipped_softmax"), fused=False),
    Variant("clipped_fused_aten", spec_for_method("clipped_softmax"), kernel=False),
    Variant("clipped_fused", spec_for_method("clipped_softmax")),
    *(Variant(f"gated_{g}", spec_for_method("gated_attention", gate_type=g))
      for g in ("linear", "mlp", "all_heads_linear", "elementwise")),
)
PRESETS = ("bert-small", "opt-small", "vit-small")


def build_group(
    preset: str, seq_len: int, batch: int
) -> tuple[dict[str, PreTrainedModel], dict[str, torch.Tensor], int]:
    """One model per variant with identical weights, the batch, and the actual number of tokens per sequence."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if preset.startswith("vit"):
        patch = 4
        # a (4 x seq_len/4)-patch image: seq_len patches plus the CLS token
        base = create_model(preset, image_size=(4 * patch, seq_len // 4 * patch))
        inputs = {"pixel_values": torch.randn(batch, 1, 4 * patch, seq_len // 4 * patch, generator=g),
                  "labels": torch.randint(0, 10, (batch,), generator=g)}
        tokens = seq_len + 1
    else:
        dropout = {"attention_probs_dropout_prob": 0.0} if preset.startswith("bert") else {"attention_dropout": 0.0}
        base = create_model(preset, max_position_embeddings=seq_len, **dropout)
        ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, -seq_len // 4:] = 0  # one padded sequence, so the padding-mask path is exercised
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        tokens = seq_len
    models = {}
    for variant in VARIANTS:
        model = apply_attention_spec(base, variant.spec)
        if variant.attn_implementation:
            model.set_attn_implementation(variant.attn_implementation)
        models[variant.name] = model.train()
    return models, inputs, tokens


def make_step(model: PreTrainedModel, inputs: dict[str, torch.Tensor], variant: Variant) -> Callable[[], None]:
    optimizer = make_optimizer(model, OptimConfig())  # the trainer's (fused) AdamW

    def step() -> None:
        with variant.context():
            model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timing(device: torch.device) -> dict[str, Any]:
    """The harness's clock for a device: this process's CPU time on CPU (other processes on a shared machine then
    barely move it), wall time with synchronisation around each call on a GPU."""
    if device.type == "cpu":
        return {"clock": time.process_time}
    return {"clock": time.perf_counter, "sync": torch.cuda.synchronize}


def saved_for_backward_bytes(step: Callable[[], None]) -> int:
    """Bytes of the tensors autograd keeps for backward during one step (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of one step above what was in use before it (CUDA allocator, or resident set on CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def measure_group(preset: str, seq_len: int, batch: int, steps: int, warmup: int, device: torch.device,
                  seconds: float = 0.0) -> list[dict[str, Any]]:
    """Step time and memory of every variant; at least ``steps`` timed rounds, more until the baseline's timed
    steps add up to ``seconds`` (so that fast models get as many samples for the median as they need)."""
    models, inputs, tokens = build_group(preset, seq_len, batch)
    layers = models[BASELINE].config.num_hidden_layers
    inputs = {k: v.to(device) for k, v in inputs.items()}
    steps_of = {}
    for variant in VARIANTS:
        steps_of[variant.name] = make_step(models[variant.name].to(device), inputs, variant)
    names = [v.name for v in VARIANTS]
    times = interleaved_times(steps_of, steps, warmup, seconds, **timing(device))  # the baseline is first
    rows = []
    for name in names:
        rows.append({
            "model": preset, "seq_len": tokens, "length": seq_len, "layers": layers, "batch": batch, "variant": name,
            "step_ms": 1000 * statistics.median(times[name]),
            "steps": len(times[name]), "step_ms_all": [round(1000 * t, 2) for t in times[name]],
            "peak_step_bytes": peak_step_memory(steps_of[name], device),
            "saved_for_backward_bytes": saved_for_backward_bytes(steps_of[name]),
        })
    base = next(r for r in rows if r["variant"] == BASELINE)
    for row in rows:
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        row["peak_ratio"] = row["peak_step_bytes"] / max(base["peak_step_bytes"], 1)
        row["saved_ratio"] = row["saved_for_backward_bytes"] / base["saved_for_backward_bytes"]
    return rows


class _AttentionCore(torch.nn.Module):
    """The attributes an attention module hands the attention function, without the projections around it."""

    def __init__(self, variant: Variant, heads: int, head_dim: int) -> None:
        super().__init__()
        self.attention_spec, self.num_key_value_groups = variant.spec, 1
        if variant.spec.gated:
            self.attn_gate = AttentionGate(variant.spec, heads * head_dim, heads, head_dim)
        if variant.attn_implementation == "eager":  # a probability tap forces the materialised softmax path
            self.attention_taps = {"probs": lambda probs: probs}


def measure_attention_core(seq_len: int, batch: int, rounds: int, device: torch.device,
                           heads: int = 8, head_dim: int = 16) -> list[dict[str, Any]]:
    """Forward+backward of the attention function alone (q, k, v -> gated output), the small models' geometry."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(3))
    hidden = torch.randn(batch, seq_len, heads * head_dim, generator=g).to(device).requires_grad_()
    upstream = torch.randn(batch, seq_len, heads, head_dim, generator=g).to(device)
    mask = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    mask[-1, ..., -seq_len // 4:] = False

    def call(variant: Variant, module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with variant.context():
                out, _ = quantizable_attention_forward(module, q, k, v, mask, attn_gate_input=hidden)
            out.backward(upstream)
        return run

    runs = {v.name: call(v, _AttentionCore(v, heads, head_dim).to(device).train()) for v in VARIANTS}
    times = interleaved_times(runs, rounds, warmup=2, **timing(device))
    base = statistics.median(times[BASELINE])
    return [{"seq_len": seq_len, "batch": batch, "variant": name, "ms": 1000 * statistics.median(t),
             "time_ratio": statistics.median(t) / base} for name, t in times.items()]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | T | variant | step ms | time x | peak MiB | peak x | saved MiB | saved x |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['variant']} | {r['step_ms']:.1f} | {r['time_ratio']:.3f} | "
            f"{r['peak_step_bytes'] / 2**20:.1f} | {r['peak_ratio']:.2f} | "
            f"{r['saved_for_backward_bytes'] / 2**20:.1f} | {r['saved_ratio']:.2f} |"
        )
    return "\n".join(lines)


def core_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| T | batch | variant | fwd+bwd ms | time x |", "|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | {r['time_ratio']:.2f} |")
    return "\n".join(lines)


def implied_step_overheads(core: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Each variant's extra attention time (attention-alone timings) times layers, over the SDPA step time: a
    second estimate of the step overhead, steadier than the step ratios on a shared machine."""
    core_ms = {(r["seq_len"], r["variant"]): r["ms"] for r in core}
    variants = [v.name for v in VARIANTS if v.name != BASELINE]
    lines = ["| model | T | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    for base in (r for r in rows if r["variant"] == BASELINE and (r["length"], BASELINE) in core_ms):
        extra = [(core_ms[base["length"], v] - core_ms[base["length"], BASELINE]) * base["layers"] / base["step_ms"]
                 for v in variants]
        lines.append(f"| {base['model']} | {base['seq_len']} | " + " | ".join(f"{100 * e:+.1f}%" for e in extra)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=128 only and fewer steps (~1 min on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch: batch = max(1, tokens // T)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5, quick 3)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="more steps until vanilla SDPA's timed steps of a group add up to this many seconds")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=PRESETS, help="models to measure")
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="sequence lengths (default 128 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allocator", choices=("kept", "default"), default="kept",
                        help="kept (default): glibc keeps freed memory, as the trainer sets it "
                             "(quantizable.training.allocator); default: glibc's own setting")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = args.allocator == "kept" and keep_freed_memory()
    device = torch.device(args.device)
    lengths = args.lengths or ((128,) if args.quick else (128, 512))
    steps = args.steps or (3 if args.quick else 5)
    run = BenchmarkRun("attention_cost", {"device": str(device), "threads": args.threads, "steps": steps,
                                          "seconds": args.seconds, "quick": args.quick, "kept_freed_memory": kept,
                                          "clock": "process CPU time (CPU) / synchronised wall time (GPU), median"})
    start = time.perf_counter()
    core = []
    for seq_len in lengths:
        core += measure_attention_core(seq_len, max(1, args.tokens // seq_len), 10 * steps, device)
    print("## attention function alone (forward + backward)\n" + core_table(core) + "\n", flush=True)
    rows = []
    for preset in args.presets:
        for seq_len in lengths:
            rows += measure_group(preset, seq_len, max(1, args.tokens // seq_len), steps, warmup=1, device=device,
                                  seconds=args.seconds)
            print(f"# {preset} T={seq_len} done: {rows[-1]['steps']} timed steps per variant "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print("## training step (forward + backward + AdamW)\n" + markdown_table(rows))
    print("\n## step overhead implied by the attention-alone timings\n" + implied_step_overheads(core, rows))
    result = run.write(args.out, rows, attention_core=core)
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
