"""The paper's outlier metrics exactly as its official evaluation scripts pool and compute them.

``analyze`` reports our own metrics (block outputs, population kurtosis, per sequence without padding) and, for the
families the official code covers, these ``paper_metrics`` beside them, so a number can be read next to the
paper's tables. The official scripts hook the modules below, view each output as ``x.view(batch, -1)`` (one row
per sample as the module returns it: OPT's FFN tensors are ``(B*T, d)``, so those rows are single tokens, and
padding is included) and average per tensor over the rows:

* ``inf_norm`` = ``max |x|`` of the row;
* ``kurtosis`` = ``mean((x - mean)^4) / (std^4 + 1e-6)`` with the *unbiased* std (the ``1e-6`` makes it
  depend on the scale of ``x``).

BERT (``validate_mlm``): FFN output ``output.dense`` and block output ``output.LayerNorm`` per block, plus the
LayerNorm's input; avg / max kurtosis over the 2L dense + LayerNorm tensors. OPT (``validate_clm``): per block the
block output, ``fc2``, ``final_layer_norm``, ``self_attn.out_proj`` and ``self_attn_layer_norm``, plus the
decoder's final LayerNorm (5L + 1 tensors); max inf norm and avg kurtosis over all of them, "max layer inf norm"
over the block outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantizable.models.families import family_of_config

KURTOSIS_EPS = 1e-6

# Block-relative names the official scripts hook, and modules outside the blocks, per family they cover.
OFFICIAL_TENSORS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {"block": ("output.dense", "output.LayerNorm"), "inputs": ("output.LayerNorm",), "outside": ()},
    "opt": {"block": ("", "fc2", "final_layer_norm", "self_attn.out_proj", "self_attn_layer_norm"), "inputs": (),
            "outside": ("model.decoder.final_layer_norm",)},
}


def official_kurtosis(rows: torch.Tensor) -> torch.Tensor:
    """Per-row kurtosis of the official scripts: 4th central moment over (unbiased std)^4 + 1e-6."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred.pow(4).mean(dim=1) / (rows.std(dim=1).pow(4) + KURTOSIS_EPS)


@dataclass
class _Meter:
    inf_norm_sum: float = 0.0
    kurtosis_sum: float = 0.0
    rows: int = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().float().reshape(x.shape[0], -1)
        self.inf_norm_sum += float(rows.abs().amax(dim=1).sum())
        self.kurtosis_sum += float(official_kurtosis(rows).sum())
        self.rows += rows.shape[0]

    @property
    def inf_norm(self) -> float:
        return self.inf_norm_sum / self.rows

    @property
    def kurtosis(self) -> float:
        return self.kurtosis_sum / self.rows


@dataclass
class PaperMetrics:
    """Per-tensor meters, filled by the hooks of :func:`recording_paper_metrics`."""

    family: str
    outputs: dict[str, _Meter] = field(default_factory=dict)
    inputs: dict[str, _Meter] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        kurtosis = {name: m.kurtosis for name, m in self.outputs.items()}
        inf_norm = {name: m.inf_norm for name, m in self.outputs.items()}
        result: dict[str, Any] = {
            "pooling": "official " + {"bert": "validate_mlm", "opt": "validate_clm"}[self.family],
            "tensors": len(self.outputs),
            "avg_kurtosis": sum(kurtosis.values()) / len(kurtosis),
            "max_kurtosis": max(kurtosis.values()),
            "max_inf_norm": max(inf_norm.values()),
        }
        if self.family == "bert":
            ffn = [v for name, v in inf_norm.items() if name.endswith("output.dense")]
            norm = [v for name, v in inf_norm.items() if name.endswith("output.LayerNorm")]
            result |= {"max_ffn_output_inf_norm": max(ffn), "max_ln_output_inf_norm": max(norm),
                       "max_ln_input_inf_norm": max(m.inf_norm for m in self.inputs.values())}
        else:
            result["max_layer_inf_norm"] = max(v for name, v in inf_norm.items() if name.endswith(":block"))
        return result


def covers_family(model: nn.Module) -> bool:
    """Whether the official scripts cover this model's family (BERT, OPT)."""
    return family_of_config(model.config).name in OFFICIAL_TENSORS


@contextmanager
def recording_paper_metrics(model: nn.Module) -> Iterator[PaperMetrics]:
    """Hooks that accumulate the official metrics over every forward inside the block."""
    family = family_of_config(model.config)
    names = OFFICIAL_TENSORS[family.name]
    metrics = PaperMetrics(family.name)
    targets: list[tuple[str, nn.Module, bool]] = []
    for block_name, block in family.blocks(model):
        for name in names["block"]:
            targets.append((f"{block_name}:block" if not name else f"{block_name}.{name}",
                            block.get_submodule(name) if name else block, False))
        targets += [(f"{block_name}.{name}", block.get_submodule(name), True) for name in names["inputs"]]
    targets += [(name, model.get_submodule(name), False) for name in names["outside"]]

    def on_output(meter: _Meter):
        return lambda module, args, output: meter.update(output[0] if isinstance(output, tuple) else output)

    def on_input(meter: _Meter):
        return lambda module, args: meter.update(args[0])

    handles = []
    try:
        for name, module, is_input in targets:
            store = metrics.inputs if is_input else metrics.outputs
            meter = store.setdefault(name, _Meter())
            hook = module.register_forward_pre_hook(on_input(meter)) if is_input else \
                module.register_forward_hook(on_output(meter))
            handles.append(hook)
        yield metrics
    finally:
        for handle in handles:
            handle.remove()
