"""Quantization-aware fine-tuning with the simulator's own quantizers (issue 33).

``train`` with ``qat.setting: w8a8`` (usually with ``--init-from RUN``) installs exactly what ``quantize`` installs
(``quantization.quantize_`` at the default setup: every weight and activation site, activations static per
tensor), calibrates the activation ranges on the first ``qat.calibration_batches`` validation batches, fixes them,
and trains through the quantizers with straight-through gradients (``quantizers.round_ste``; the clamp passes
gradient inside the range). Weight ranges are re-estimated from the current weights at every forward, as
``quantize`` estimates them from the final weights. The ranges are not learned. Before the model is saved the
quantizers are removed, so the run is a normal model that ``quantize`` scores like any other.

torchao's QAT (``torchao.quantization.qat``: ``FakeQuantizedLinear``, ``IntxFakeQuantizeConfig``) fake-quantizes
only the inputs and weights of linear layers; the simulator also quantizes residual sums, norm outputs and the
attention scores / probabilities / context taps, so training against torchao's sites would not be training against
what ``quantize`` measures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from quantizable.quantization import QuantConfig, calibrate, freeze, quantize_
from quantizable.quantization.placement import QuantizedModelHandle

SETTING = re.compile(r"w(\d+)a(\d+)")


def parse_setting(text: str) -> QuantConfig:
    """``"w8a8"`` -> ``QuantConfig(weight_bits=8, act_bits=8)`` (the ``quantize`` verb's defaults otherwise)."""
    match = SETTING.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"qat.setting must look like w8a8 (weight and activation bits), got {text!r}")
    return QuantConfig(weight_bits=int(match.group(1)), act_bits=int(match.group(2)))


def prepare_qat(model: nn.Module, config: QuantConfig,
                batches: Iterable[dict[str, torch.Tensor]]) -> QuantizedModelHandle:
    """Install the simulator's quantizers on ``model``, calibrate activations on ``batches`` and fix them; weights
    keep estimating their range from the current weights. Returns the handle (``handle.remove()`` undoes it)."""
    handle = quantize_(model, config)
    calibrate(model, batches)
    freeze(model)
    handle.set_state(weights="estimate", acts="frozen")
    return handle
