"""How the reproduction's reports name methods, families and tasks, and the headless matplotlib they draw with
(shared by ``report`` and ``curves``, so neither imports the other)."""

from __future__ import annotations

from typing import Any

from quantizable.models.families import FAMILIES

METHOD_NAMES = {"vanilla": "Vanilla", "clipped_softmax": "Clipped softmax", "gated_attention": "Gated attention",
                "softmax_plus_one": "Softmax + 1", "sink_token": "Sink token", "key_bias": "Key bias",
                "sigmoid": "Sigmoid attention", "softpick": "Softpick", "value_gate": "Value gate",
                "sink_logit": "Sink logit"}
TASK_NAMES = {"backcopy": "Bigram-Backcopy", "pretrain": "pre-training"}


def family_name(family: str) -> str:
    return FAMILIES[family].display_name if family in FAMILIES else family


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: reports are written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
