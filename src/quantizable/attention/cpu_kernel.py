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
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from quantizable.attention.switch import Switch

SOURCE = Path(__file__).parent / "kernels" / "attention_rows.c"
# -march=native: the library is built on the machine that runs it; -ffast-math lets the row reductions vectorise
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-shared", "-fPIC")
# Below this many scores per block one thread does the rows: handing work to other threads costs more.
PARALLEL_MIN_ELEMENTS = 2**16

_pointer_t, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _cache_dir() -> Path:
    return Path(os.environ.get("QUANTIZABLE_KERNELS") or Path.home() / ".cache" / "quantizable" / "kernels")


def _cpu_identity() -> str:
    """The CPU's feature flags: a library built with -march=native must not run on a CPU without them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text[:4096])


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, compiler, _cpu_identity()]).encode()).hexdigest()
    library = _cache_dir() / f"attention_rows-{key[:16]}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.stem}.{os.getpid()}.tmp.so")
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(partial, library)  # atomic: concurrent workers never load a half-written library
    return library


use_cpu_kernel = Switch("Use (default) or bypass the C kernel, e.g. to compare it with the ATen ops.")


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether work on ``tensors`` runs in the kernels: all float32 on CPU, kernels enabled and built."""
    on_cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return use_cpu_kernel.enabled and on_cpu_fp32 and load_kernel() is not None


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` (with one warning saying why) when it cannot be built."""
    if os.environ.get("QUANTIZABLE_NO_KERNEL", "") not in ("", "0"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("no C compiler found: clipped softmax and the linear gate use slower ATen ops", stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"building the attention kernels failed ({detail}); using ATen ops", stacklevel=2)
        return None
    library.clipped_softmax_forward.argtypes = [_pointer_t, _pointer_t, _i64, _i64, _i64, _f32, _f32, _f32,
                                                _pointer_t, _i64, _i64, _i64, _i64, _i64]
    library.clipped_softmax_backward.argtypes = [_pointer_t, _pointer_t, _pointer_t, _i64, _i64, _i64, _f32, _f32,
                                                 _f32, _pointer_t, _f32]
    library.linear_gate_forward.argtypes = [*[_pointer_t] * 6, _i64, _i64, _i64, _i64]
    library.linear_gate_backward.argtypes = [*[_pointer_t] * 9, _i64, _i64, _i64, _i64]
    for function in ("clipped_softmax_forward", "clipped_softmax_backward", "linear_gate_forward",
                     "linear_gate_backward"):
        getattr(library, function).restype = None
    return library


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
                         causal_offset: int = 0) -> torch.Tensor:
    """In place on a contiguous float32 ``(B, H, R, T_k)`` block of raw scores ``q @ k^T``: scores become the
    clipped probabilities of ``scale * scores (+ key_bias)``; returns the softmax probabilities (for backward).

    ``key_bias`` is a contiguous ``(B, T_k)`` additive mask; ``causal`` lets the block's query row ``i`` (at
    position ``row_start + i``) see keys ``j <= row_start + i + causal_offset``.
    """
    library = load_kernel()
    batch, heads, rows, cols = scores.shape
    probs = torch.empty_like(scores)
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


# the most heads the gate kernel's per-token arrays hold (MAX_HEADS in attention_rows.c)
MAX_GATE_HEADS = 256


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
    return grad_output, grad_x, total[: heads * dim].view(heads, dim), total[heads * dim:]
