"""A process-wide on/off setting that a ``with`` block can change for its duration (timm's ``fused_attn`` idea)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Switch:
    """``switch.enabled`` is read where the choice is made; ``with switch(False):`` changes it inside the block."""

    def __init__(self, doc: str, enabled: bool = True) -> None:
        self.__doc__, self.enabled = doc, enabled

    @contextmanager
    def __call__(self, enabled: bool) -> Iterator[None]:
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous


fused_attention = Switch(
    "Use (default) or bypass the fast paths inside the block (clipped softmax's single node, the fused linear "
    "gate), e.g. to compare them with the reference ops or to trace plain torch ops for export."
)

compiled_fast_paths = Switch(
    "Under torch.compile / torch.export, trace the fast paths as our custom ops (off by default: Inductor's own "
    "fusion of the reference ops made a compiled training step 4-10 % faster than with our kernels on CPU, "
    "benchmarks/bench_compile.py).",
    enabled=False,
)


def fast_paths_apply() -> bool:
    """Whether attention takes the fast paths here: ``fused_attention`` on, and not being compiled unless
    ``compiled_fast_paths`` asks for our ops there too."""
    return fused_attention.enabled and (compiled_fast_paths.enabled or not torch.compiler.is_compiling())
