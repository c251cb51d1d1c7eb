"""The benchmarks' harness: one interleaved timing loop and one result file schema.

Our machines are shared and their speed drifts by tens of percent from minute to minute, so every benchmark
compares callables in one run, interleaved (round ``i`` times each callable once, starting one later each round) and
reports ratios of per-round samples; and every result file records what the figure depends on: the CPU's speed
flags (the same INT8 graph gains ~2x or ~4x with or without VNNI), thread count, library versions and the load
average before and after. ``benchmarks/README.md`` lists the scripts.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantizable.io import write_json_atomic

SCHEMA_VERSION = 1
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU's ``SPEED_FLAGS`` (from Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in line.split(":", 1)[1].split() if flag in SPEED_FLAGS)


def _cpu_model() -> str:
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the OS has none): how busy the machine was."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What a timing depends on besides the code: CPU, speed flags, cores, threads, library versions, load."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"cpu": _cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": load_average()}


def interleaved_times(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, seconds: float = 0.0,
                      clock: Callable[[], float] = time.perf_counter,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each callable: ``warmup`` untimed rounds, then timed rounds until ``rounds`` are done and
    the first callable has run for ``seconds`` in total. Each round calls every callable once, the order rotated by
    one per round, so load from other processes and thermal drift hit all alike and round ``i`` of each pairs with
    round ``i`` of the others (:func:`paired_ratio`). ``clock``: ``time.process_time`` measures this process's CPU
    time only (barely moved by other processes on a shared CPU); ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before and after each call on an asynchronous device."""
    names = list(calls)
    if not names:
        raise ValueError("nothing to time")
    times: dict[str, list[float]] = {name: [] for name in names}
    round_ = 0
    while round_ < warmup + rounds or sum(times[names[0]]) < seconds:
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = clock()
            calls[name]()
            if sync is not None:
                sync()
            if round_ >= warmup:
                times[name].append(clock() - start)
        round_ += 1
    return times


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratio ``numerator / denominator``: a ratio of two medians would mix
    rounds taken at different machine speeds, the per-round ratio does not."""
    ratios = [a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)]
    low, median, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": median, "q1": low, "q3": high}


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def model_geometry(family: str, width: int, layers: int, seq_len: int) -> tuple[str, dict[str, Any]]:
    """A preset and overrides for ``layers`` blocks of width ``width`` (heads of 64, the family's usual FFN width:
    4d, Llama's SwiGLU 8d/3 rounded to 64, with grouped-query attention at 2 query heads per key/value head) and the
    family's full vocabulary: the shapes the INT8 benchmarks compare at d=256 and d=768."""
    heads = width // 64
    if family == "bert":
        return "bert-small", {"hidden_size": width, "num_attention_heads": heads, "intermediate_size": 4 * width,
                              "num_hidden_layers": layers}
    if family == "opt":
        return "opt-small", {"hidden_size": width, "word_embed_proj_dim": width, "num_attention_heads": heads,
                             "ffn_dim": 4 * width, "num_hidden_layers": layers}
    if family == "llama":
        return "llama-tiny", {"vocab_size": 32000, "hidden_size": width, "num_attention_heads": heads,
                              "num_key_value_heads": heads // 2, "intermediate_size": 64 * round(8 * width / 3 / 64),
                              "num_hidden_layers": layers, "max_position_embeddings": 2 * seq_len}
    raise ValueError(f"unknown family {family!r}; known: bert, opt, llama")


def random_ids(vocab: int, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """A seeded batch of random token ids without padding (timings do not depend on the tokens)."""
    ids = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


class BenchmarkRun:
    """One benchmark's result file: create it when the benchmark starts (machine info and load are taken then) and
    :meth:`write` its rows, as often as a long benchmark likes (each write is atomic and complete)."""

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self.name, self.settings = name, settings
        self.machine = machine_info()
        self.started = time.perf_counter()
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def write(self, path: Path, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        result = {"schema": SCHEMA_VERSION, "benchmark": self.name, "date": self.date, "commit": _commit(),
                  "machine": {**self.machine, "load_average_after": load_average()},
                  "settings": self.settings, "wall_s": round(time.perf_counter() - self.started, 1),
                  **extra, "rows": rows}
        write_json_atomic(path, result)
        return result


def ort_single_op(directory: Path, name: str, op: str, x_type: int, weight: Any, threads: int) -> Any:
    """A one-node ONNX graph ``y = op(x, W)`` (``MatMul`` on float, ``MatMulInteger`` on 8-bit ``x``; ``W`` a numpy
    initializer) as an ORT CPU session with ``threads`` threads: the GEMM limit's kernels (bench_gemm_limit,
    bench_int8)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    y_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], name,
                              [helper.make_tensor_value_info("x", x_type, ["m", weight.shape[0]])],
                              [helper.make_tensor_value_info("y", y_type, ["m", weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    path = Path(directory) / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# the 8-bit kernel kinds of one ORT ``MatMulInteger`` (activations x weights): u8 x s8 is what MLAS runs fastest but
# saturates without VNNI; u8 x u8 (weights with zero point 128) is the exact kind an INT8 model takes there; s8 x s8 is
# exact too but a much slower kernel on AVX2 (docs/int8.md, "Exact INT8 GEMMs")
GEMM_KINDS = ("u8u8", "u8s8", "s8s8")


def ort_gemm_limit_calls(directory: Path, tokens: int, k: int, n: int, threads: int,
                         kinds: tuple[str, ...] = ("u8s8",), prefix: str = "gemm") -> dict[str, Callable[[], Any]]:
    """Callables of one ORT GEMM (``tokens x k -> n``) in FP32 (``{prefix}_fp32``) and in INT8 of each kernel kind of
    ``GEMM_KINDS`` asked for (``{prefix}_u8u8`` ...), to time in the same interleaved run as a model: FP32 time / a
    kind's time is the same-run GEMM limit of that kind."""
    import numpy as np
    from onnx import TensorProto

    unknown = set(kinds) - set(GEMM_KINDS)
    if unknown:
        raise ValueError(f"unknown GEMM kinds {sorted(unknown)}; known: {GEMM_KINDS}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / k**0.5).astype(np.float32)
    fp32 = ort_single_op(directory, f"{prefix}_fp32", "MatMul", TensorProto.FLOAT, w, threads)
    calls: dict[str, Callable[[], Any]] = {f"{prefix}_fp32": lambda: fp32.run(None, {"x": x})}
    for kind in kinds:
        if kind.startswith("u8"):
            qx, x_type = rng.integers(0, 256, (tokens, k), dtype=np.uint8), TensorProto.UINT8
        else:
            qx, x_type = rng.integers(-127, 128, (tokens, k), dtype=np.int8), TensorProto.INT8
        qw = rng.integers(0, 256, (k, n), dtype=np.uint8) if kind.endswith("u8") else \
            rng.integers(-127, 128, (k, n), dtype=np.int8)
        session = ort_single_op(directory, f"{prefix}_{kind}", "MatMulInteger", x_type, qw, threads)
        calls[f"{prefix}_{kind}"] = lambda session=session, qx=qx: session.run(None, {"x": qx})
    return calls
