"""The C row kernel of clipped-softmax attention (``kernels/clipped_softmax.c``), built on first use.

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

SOURCE = Path(__file__).parent / "kernels" / "clipped_softmax.c"
# -march=native: the library is built on the machine that runs it; -ffast-math vectorises expf (glibc's libmvec)
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
    library = _cache_dir() / f"clipped_softmax-{key[:16]}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.stem}.{os.getpid()}.tmp.so")
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(partial, library)  # atomic: concurrent workers never load a half-written library
    return library


use_cpu_kernel = Switch("Use (default) or bypass the C kernel, e.g. to compare it with the ATen ops.")


def kernel_applies(tensor: torch.Tensor) -> bool:
    """Whether clipped-softmax attention on ``tensor`` runs in the kernel: float32 on CPU, kernel enabled and built."""
    on_cpu_fp32 = tensor.device.type == "cpu" and tensor.dtype == torch.float32
    return use_cpu_kernel.enabled and on_cpu_fp32 and load_kernel() is not None


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` (with one warning saying why) when it cannot be built."""
    if os.environ.get("QUANTIZABLE_NO_KERNEL", "") not in ("", "0"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("no C compiler found: clipped-softmax attention uses the slower ATen path", stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"building the clipped-softmax kernel failed ({detail}); using the ATen path", stacklevel=2)
        return None
    library.clipped_softmax_forward.argtypes = [_pointer_t, _pointer_t, _i64, _i64, _i64, _f32, _f32, _f32,
                                                _pointer_t, _i64, _i64, _i64, _i64, _i64]
    library.clipped_softmax_backward.argtypes = [_pointer_t, _pointer_t, _pointer_t, _i64, _i64, _i64, _f32, _f32,
                                                 _f32, _pointer_t, _f32]
    library.clipped_softmax_forward.restype = library.clipped_softmax_backward.restype = None
    return library


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="clipped-softmax")


def _over_rows(call: Callable[[int, int], None], rows: int, cols: int) -> None:
    """``call(row_begin, row_end)`` over all rows, split across torch's threads when the block is large enough
    (ctypes releases the GIL during the call)."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or rows * cols < PARALLEL_MIN_ELEMENTS:
        call(0, rows)
        return
    bounds = [rows * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(call, bounds[:-1], bounds[1:]))


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
    _over_rows(lambda begin, end: library.clipped_softmax_forward(
        s, p, begin, end, cols, scale, gamma, zeta, bias, heads * rows, int(causal), rows, row_start, causal_offset),
        batch * heads * rows, cols)
    return probs


def clipped_softmax_rows_backward(grad: torch.Tensor, probs: torch.Tensor, clipped: torch.Tensor, gamma: float,
                                  zeta: float, grad_scale: float = 1.0, keep: torch.Tensor | None = None,
                                  keep_scale: float = 1.0) -> None:
    """In place on contiguous float32 blocks: ``grad`` (``dO @ V^T``) becomes the scores' gradient, with the
    scalar factors ``grad_scale`` applied; ``clipped`` receives the clipped probabilities (times ``keep * keep_scale`` under
    dropout, ``keep`` a contiguous uint8 mask) that ``dV`` needs."""
    library = load_kernel()
    cols = grad.shape[-1]
    g, p, c, k = _pointer(grad), _pointer(probs), _pointer(clipped), _pointer(keep)
    _over_rows(lambda begin, end: library.clipped_softmax_backward(g, p, c, begin, end, cols, gamma, zeta,
                                                                   grad_scale, k, keep_scale),
               grad.numel() // cols, cols)
