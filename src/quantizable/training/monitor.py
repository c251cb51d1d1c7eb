"""What the trainer measures on a fixed validation batch while it trains: the outlier and no-op metrics of
``analyze`` (``run.outlier_every``) and, at step 0, whether attention is alive at all."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The numbers of ``analyze`` logged during training: the paper's outlier metrics and the no-op mechanism's
# (alive_share only for kinds with exact zeros: the lowest layer's share of attention entries above zero)
TRAINING_METRICS = ("max_inf_norm", "avg_kurtosis", "sink_share", "value_drain", "residual_peak", "dormant_share",
                    "alive_share")
# analyze's per-layer liveness keys, logged at step 0 for kinds with exact zeros
LIVENESS_KEYS = ("alive_share_per_layer", "dead_row_share_per_layer", "dead_layers")


def _analyze_one(model: nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, Any]:
    from quantizable.analysis import analyze

    return analyze(model, [{k: v for k, v in batch.items() if k != "labels"}], tokenizer=tokenizer)


def training_outlier_metrics(model: nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, float]:
    """``analyze``'s model-level numbers on one fixed batch (the same definitions as every report)."""
    result = _analyze_one(model, batch, tokenizer)
    return {key: float(result[key]) for key in TRAINING_METRICS if result.get(key) is not None}


def attention_liveness(model: nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, Any] | None:
    """Per layer, the share of attention entries above zero and of all-zero rows on one batch, and the layers with
    no entry above zero (they output zero and pass no gradient to q, k, v); None for kinds without exact zeros."""
    spec = getattr(model, "attention_spec", None)
    if spec is None or not spec.exact_zeros:
        return None
    result = _analyze_one(model, batch, tokenizer)
    return {key: result[key] for key in LIVENESS_KEYS}


def dead_attention_warning(model: nn.Module, liveness: dict[str, Any]) -> str | None:
    """One line naming the layers whose attention is dead and what brings them to life, or None."""
    dead = liveness["dead_layers"]
    if not dead:
        return None
    spec = model.attention_spec
    layers = model.config.num_hidden_layers
    if spec.kind == "clipped_softmax":
        why = (f"no attention probability is above clipped softmax's threshold {spec.clip_threshold():.3g} "
               f"(gamma={spec.resolved_gamma():.4g})")
        fix = "set attention.qk_init=lecun (initial score spread ~1) or a smaller |gamma| (alpha = -gamma*T < ~1)"
    else:
        why = "every softpick row is all zero (no score above 0)"
        fix = "set attention.qk_init=lecun (initial score spread ~1)"
    return (f"warning: attention is dead at step 0 in layer(s) {', '.join(map(str, dead))} of {layers}: {why}, so "
            f"these layers output zero and pass no gradient to q, k, v and never learn; {fix} "
            "(docs/reproduce.md, 'Clipped softmax at initialisation')")
