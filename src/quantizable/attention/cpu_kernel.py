"""The C row kernels of the attention variants (``kernels/attention_rows.c``), built on first use.

Clipped softmax on rows of attention scores (used by ``attention.fused``) and the linear attention gate on rows of
attention output (used by ``attention.gates``).

It is plain C on float32 buffers, called through ``ctypes``: no torch headers, so ``cc`` builds it in about a
second, once per machine and source version, into ``$QUANTIZABLE_KERNELS`` (default ``~/.cache/quantizable/kernels``).
Without a C compiler, or with ``QUANTIZABLE_NO_KERNEL=1``, ``load_kernel()`` returns ``None`` and attention uses
the ATen ops of ``attention.fused`` instead (same values up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from filelock import FileLock  # a dependency of torch itself

from quantizable.attention.switch import Switch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "attention_rows.c"
# -march=native: the library is built on the machine that runs it. Not -ffast-math: on a shared library GCC < 13
# then links crtfastmath.o, whose constructor switches on flush-to-zero for the whole process (1e-308 / 10 == 0.0
# in plain Python after loading us). Of its parts these four keep the loops vectorised (GCC 12's -fopt-info-vec
# reports the same loops): -fno-trapping-math lets the exp, sigmoid and clamp-gradient loops if-convert,
# -fassociative-math (with -fno-signed-zeros) vectorises the reductions' remainder loops, -fno-math-errno lets libm
# calls inline. Not -ffinite-math-only: with it a NaN score came out as probability 0 (the row's error hidden); the
# price is about 12% on the clipped-softmax row sweeps (compare-and-blend for min/max instead of vmaxps;
# docs/performance.md), nothing on the gate's.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
         "-fopenmp-simd", "-shared", "-fPIC")
# The most heads the gate kernel's per-token arrays hold: given to the C source as -DMAX_HEADS, its only definition.
MAX_GATE_HEADS = 256
DEFINES = {"MAX_HEADS": MAX_GATE_HEADS}
# Below this many scores per block one thread does the rows: handing work to other threads costs more.
PARALLEL_MIN_ELEMENTS = 2**16

# ctypes types of the C parameter types in the kernels' signatures
_C_TYPES = {"float *": ctypes.c_void_p, "uint8_t *": ctypes.c_void_p, "int64_t": ctypes.c_int64,
            "float": ctypes.c_float}


def _cache_dir() -> Path:
    return Path(os.environ.get("QUANTIZABLE_KERNELS") or Path.home() / ".cache" / "quantizable" / "kernels")


CPUINFO = Path("/proc/cpuinfo")


def _cpu_identity() -> str:
    """The CPU's feature flags: a library built with -march=native must not run on a CPU without them."""
    try:
        text = CPUINFO.read_text()
    except OSError:  # not Linux: the architecture (and processor name, where the OS gives one) stands in
        return f"{platform.machine()} {platform.processor()}"
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text[:4096])


def signatures(source: str) -> dict[str, list[type]]:
    """The ctypes ``argtypes`` of every exported (non-static) ``void`` function of the C ``source``: read from the C
    signatures themselves, so the two cannot disagree."""
    found = {}
    for name, params in re.findall(r"^void (\w+)\(([^)]*)\)", source, flags=re.MULTILINE):
        kinds = (re.sub(r"\b(const|restrict)\b|\w+$", "", param).split() for param in params.split(","))
        found[name] = [_C_TYPES[" ".join(kind)] for kind in kinds]
    return found


def compile_command(compiler: str, output: Path) -> list[str]:
    return [compiler, *FLAGS, *(f"-D{name}={value}" for name, value in DEFINES.items()), "-o", str(output),
            str(SOURCE), "-lm"]


def _build(compiler: str) -> Path:
    """The cached library for this source, flags, compiler and CPU, compiled first if missing.

    Safe under concurrent first use by threads and processes: one file lock per library, each build into its own
    temporary file, published by an atomic rename, so no process ever loads a half-written library.
    """
    parts = [SOURCE.read_text(), *compile_command(compiler, Path("out")), _cpu_identity()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    library = _cache_dir() / f"attention_rows-{key[:16]}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(library.with_suffix(".lock")):
        if library.is_file():  # another process built it while we waited
            return library
        descriptor, partial = tempfile.mkstemp(prefix=library.stem + ".", suffix=".tmp.so", dir=library.parent)
        os.close(descriptor)
        try:
            subprocess.run(compile_command(compiler, Path(partial)), check=True, capture_output=True, text=True)
            os.replace(partial, library)
        finally:
            Path(partial).unlink(missing_ok=True)
    return library


use_cpu_kernel = Switch("Use (default) or bypass the C kernel, e.g. to compare it with the ATen ops.")


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether work on ``tensors`` runs in the kernels: all float32 on CPU, kernels enabled and built."""
    on_cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return use_cpu_kernel.enabled and on_cpu_fp32 and kernel_built()


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant (no tracing into the lock)
def kernel_built() -> bool:
    """Whether the kernel library is built and loaded (decided once per process)."""
    return load_kernel() is not None


_load_lock = threading.Lock()


def _first_line(error: Exception) -> str:
    text = (getattr(error, "stderr", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.cache
def _load() -> ctypes.CDLL | None:
    if os.environ.get("QUANTIZABLE_NO_KERNEL", "") not in ("", "0"):
        return None
    if not SOURCE.is_file():  # the copy saved beside a model as remote code carries no C source: ATen, quietly
        log.info("no kernel source at %s: clipped softmax and the linear gate use ATen ops", SOURCE)
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: clipped softmax and the linear gate use slower ATen ops")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:  # no such compiler, compile error, unloadable result
        log.warning("building the attention kernels with %s failed (%s): using ATen ops", compiler,
                    _first_line(error))
        return None
    for name, argtypes in signatures(SOURCE.read_text()).items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` (with one logged line saying why) when it cannot be built."""
    with _load_lock:  # threads arriving together wait for one build and load instead of racing each other
        return _load()


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="attention-rows")


def _row_ranges(rows: int, cols: int) -> list[tuple[int, int]]:
    """``(begin, end)`` ranges of rows, one per torch thread when there is enough work to share, else one."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or rows * cols < PARALLEL_MIN_ELEMENTS:
        return [(0, rows)]
    bounds = [rows * i // threads for i in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _over_rows(call: Callable[[int, int, int], None], ranges: list[tuple[int, int]]) -> None:
    """``call(range_index, row_begin, row_end)`` for each range, in parallel threads when there are several
    (ctypes releases the GIL during the call)."""
    if len(ranges) == 1:
        call(0, *ranges[0])
    else:
        list(_pool(len(ranges)).map(call, range(len(ranges)), *zip(*ranges)))


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def clipped_softmax_rows(scores: torch.Tensor, scale: float, gamma: float, zeta: float,
                         key_bias: torch.Tensor | None = None, causal: bool = False, row_start: int = 0,
                         causal_offset: int = 0, probs: torch.Tensor | None = None) -> torch.Tensor:
    """In place on a contiguous float32 ``(B, H, R, T_k)`` block of raw scores ``q @ k^T``: scores become the
    clipped probabilities of ``scale * scores (+ key_bias)``; returns the softmax probabilities (for backward),
    written to ``probs`` (contiguous, the scores' shape) where given.

    ``key_bias`` is a contiguous ``(B, T_k)`` additive mask; ``causal`` lets the block's query row ``i`` (at
    position ``row_start + i``) see keys ``j <= row_start + i + causal_offset``.
    """
    library = load_kernel()
    batch, heads, rows, cols = scores.shape
    probs = torch.empty_like(scores) if probs is None else probs
    s, p, bias = _pointer(scores), _pointer(probs), _pointer(key_bias)
    _over_rows(lambda _, begin, end: library.clipped_softmax_forward(
        s, p, begin, end, cols, scale, gamma, zeta, bias, heads * rows, int(causal), rows, row_start, causal_offset),
        _row_ranges(batch * heads * rows, cols))
    return probs


def clipped_softmax_rows_backward(grad: torch.Tensor, probs: torch.Tensor, clipped: torch.Tensor, gamma: float,
                                  zeta: float, grad_scale: float = 1.0, keep: torch.Tensor | None = None,
                                  keep_scale: float = 1.0) -> None:
    """In place on contiguous float32 blocks: ``grad`` (``dO @ V^T``) becomes the scores' gradient, with the
    scalar factors ``grad_scale`` applied; ``clipped`` receives the clipped probabilities (times
    ``keep * keep_scale`` under dropout, ``keep`` a contiguous uint8 mask) that ``dV`` needs."""
    library = load_kernel()
    cols = grad.shape[-1]
    g, p, c, k = _pointer(grad), _pointer(probs), _pointer(clipped), _pointer(keep)
    _over_rows(lambda _, begin, end: library.clipped_softmax_backward(g, p, c, begin, end, cols, gamma, zeta,
                                                                      grad_scale, k, keep_scale),
               _row_ranges(grad.numel() // cols, cols))


def linear_gate_rows(output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output * pi, pi)``, ``pi = sigmoid(bias[h] + x[..., h, :] . weight[h])``, for contiguous float32 ``output``
    ``(..., H, d)``, ``x`` ``(..., H * d)``, ``weight`` ``(H, d)`` and ``bias`` ``(H,)``; ``pi`` is ``(..., H)``."""
    library = load_kernel()
    heads, dim = weight.shape
    gated, pi = torch.empty_like(output), output.new_empty(output.shape[:-1])
    pointers = [_pointer(t) for t in (output, x, weight, bias, gated, pi)]
    _over_rows(lambda _, begin, end: library.linear_gate_forward(*pointers, begin, end, heads, dim),
               _row_ranges(output.numel() // (heads * dim), heads * dim))
    return gated, pi


def linear_gate_rows_backward(grad: torch.Tensor, output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(output, x, weight, bias)`` of ``linear_gate_rows`` for the gated output's gradient ``grad``."""
    library = load_kernel()
    heads, dim = weight.shape
    grad_output, grad_x = torch.empty_like(output), torch.empty_like(x)
    ranges = _row_ranges(output.numel() // (heads * dim), heads * dim)
    # each range of tokens sums its (weight, bias) gradients into its own row, added up afterwards
    sums = weight.new_zeros(len(ranges), heads * (dim + 1))
    pointers = [_pointer(t) for t in (grad, output, x, weight, pi, grad_output, grad_x)]
    _over_rows(lambda index, begin, end: library.linear_gate_backward(
        *pointers, _pointer(sums[index]), _pointer(sums[index, heads * dim:]), begin, end, heads, dim), ranges)
    total = sums.sum(0)
    # the bias gradient copied out (heads floats): outputs of a custom op must not share storage
    return grad_output, grad_x, total[: heads * dim].view(heads, dim), total[heads * dim:].clone()
