"""A process-wide on/off setting that a ``with`` block can change for its duration (timm's ``fused_attn`` idea)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
