"""Post-training quantization simulator (paper section 5): fake-quantized weights and activations with static
ranges on stock or quantizable BERT/OPT/ViT/Llama models, torchao-style ``quantize_(model, QuantConfig(...))``."""

from quantizable.quantization.calibration import calibrate, freeze, simulate_w8a8
from quantizable.quantization.config import QuantConfig
from quantizable.quantization.estimators import RangeEstimator, parse_estimator
from quantizable.quantization.placement import QuantizedModelHandle, handle_of, quantize_, site_table
from quantizable.quantization.quantizers import FakeQuantizer, fake_quantize, quant_params, round_ste

__all__ = [
    "FakeQuantizer", "QuantConfig", "QuantizedModelHandle", "RangeEstimator", "calibrate", "fake_quantize",
    "freeze", "handle_of", "parse_estimator", "quant_params", "quantize_", "round_ste", "simulate_w8a8",
    "site_table",
]
