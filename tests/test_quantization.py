"""Post-training quantization simulator: eq. (1), estimators, placement on every family, CLI."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.pytorch_utils import Conv1D
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from quantizable.models import create_model
from quantizable.quantization import (
    QuantConfig,
    calibrate,
    fake_quantize,
    freeze,
    parse_estimator,
    quant_params,
    quantize_,
    simulate_w8a8,
    site_table,
)
from tests.conftest import TINY_PRESETS, tiny_batch

torch.set_num_threads(1)  # tiny models: threads only add contention on the shared CPU

# Activation sites per family for L blocks (docs/quantization.md explains each term).
SITE_FORMULA = {
    "bert": lambda L: 14 * L + 2,
    "opt": lambda L: 14 * L + 2,
    "vit": lambda L: 14 * L + 3,
    "llama": lambda L: 16 * L + 1,
    # per block: ln_1 out, c_attn, c_proj, 3 taps, ln_2 in + out, c_fc, act, mlp.c_proj, block out; + wte+wpe, ln_f
    "gpt2": lambda L: 12 * L + 2,
    # as Llama: input norm out, q/k/v/o, 3 taps, post-attention norm in + out, gate/up/down, act, act*up, block out
    "qwen2": lambda L: 16 * L + 1,
}


def _t(value: float) -> torch.Tensor:
    return torch.tensor(value)


def test_asymmetric_hand_case() -> None:
    scale, zero_point, lo, hi = quant_params(_t(-0.3), _t(5.2), 8, symmetric=False)
    assert (lo, hi) == (0, 255)
    assert scale.item() == pytest.approx(5.5 / 255)
    assert zero_point.item() == 14 == round(0.3 / (5.5 / 255))
    x = torch.tensor([0.0, -0.3, 5.2, 10.0, -1.0, 1.0])
    q = fake_quantize(x, _t(-0.3), _t(5.2), 8, symmetric=False)
    s = 5.5 / 255
    expected = [0.0, -14 * s, (255 - 14) * s, (255 - 14) * s, -14 * s, round(1.0 / s) * s]
    assert torch.allclose(q, torch.tensor(expected), atol=1e-6)
    assert q[0].item() == 0.0  # zero is exactly representable


def test_asymmetric_range_always_contains_zero() -> None:
    scale, zero_point, _, _ = quant_params(_t(2.0), _t(4.0), 8, symmetric=False)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(4.0 / 255)


def test_symmetric_case() -> None:
    scale, zero_point, lo, hi = quant_params(_t(-1.0), _t(0.5), 8, symmetric=True)
    assert (lo, hi) == (-128, 127) and zero_point.item() == 0
    assert scale.item() == pytest.approx(1 / 127)
    q = fake_quantize(torch.tensor([-1.0, 0.5, 2.0, -2.0, 0.003]), _t(-1.0), _t(0.5), 8, symmetric=True)
    assert torch.allclose(q, torch.tensor([-1.0, 64 / 127, 1.0, -128 / 127, 0.0]), atol=1e-6)
    q4 = fake_quantize(torch.linspace(-1, 1, 101), _t(-1.0), _t(1.0), 4, symmetric=True)
    assert len(q4.unique()) == 15  # -7..7 (the scale maps max|x| to 7)


def test_straight_through_gradient() -> None:
    x = torch.tensor([-1.0, 0.013, 0.5, 2.0, 9.0], requires_grad=True)
    fake_quantize(x, _t(-0.5), _t(1.0), 8, symmetric=False).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # identity inside the range, zero where clipped


@pytest.mark.parametrize("field,value", [("weight_bits", 1), ("act_bits", 17), ("weight_bits", 8.0)])
def test_bits_validated(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_estimator_parsing() -> None:
    assert parse_estimator("percentile:99.999").percentile == 99.999
    assert parse_estimator("running_minmax").momentum == 0.9
    assert parse_estimator("current_minmax").momentum is None
    for bad in ("minmax2", "percentile:", "percentile:20"):
        with pytest.raises(ValueError):
            parse_estimator(bad)
    with pytest.raises(ValueError, match="act_estimator"):
        QuantConfig(act_estimator="l2")


def test_estimators_on_heavy_tails() -> None:
    x = torch.distributions.StudentT(1.5).sample((50_000,))
    ranges = {
        name: parse_estimator(name).update(x, None, 8, False, None)
        for name in ("current_minmax", "percentile:99.99", "mse")
    }
    minmax_low, minmax_high = ranges["current_minmax"]
    for name, shrink in (("percentile:99.99", 0.9), ("mse", 1.0)):
        low, high = ranges[name]
        assert high - low < shrink * (minmax_high - minmax_low), name
        assert minmax_low <= low < 0 < high <= minmax_high, name

    def error(r):
        return (fake_quantize(x, r[0], r[1], 8, False) - x).pow(2).sum()

    assert error(ranges["mse"]) <= error(ranges["current_minmax"])
    gauss = torch.randn(50_000)  # at 4 bits the MSE-optimal clipping of a Gaussian is far inside min/max
    low, high = parse_estimator("mse").update(gauss, None, 4, True, None)
    assert high - low < 0.8 * (gauss.max() - gauss.min())


@pytest.mark.parametrize("name", ["current_minmax", "percentile:99.9", "mse"])
def test_per_channel_estimates(name: str) -> None:
    weight = torch.randn(5, 40) * torch.arange(1, 6)[:, None]
    low, high = parse_estimator(name).update(weight, None, 8, True, channel_axis=0)
    assert low.shape == high.shape == (5,)
    assert bool((high > 0).all()) and bool((high[1:] > high[:1]).all())  # follows each row's scale


def test_running_minmax_is_an_ema() -> None:
    estimator = parse_estimator("running_minmax")
    first = estimator.update(torch.tensor([-1.0, 1.0]), None, 8, False, None)
    second = estimator.update(torch.tensor([-3.0, 11.0]), first, 8, False, None)
    assert second[0].item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert second[1].item() == pytest.approx(0.9 * 1 + 0.1 * 11)


def test_per_channel_weights_have_one_range_per_output_channel() -> None:
    model = create_model("bert-tiny").eval()
    batch = tiny_batch("bert-tiny")
    quantize_(model, QuantConfig(per_channel_weights=True))
    calibrate(model, [batch])
    freeze(model)
    rows = {row["name"]: row for row in site_table(model)}
    query = model.bert.encoder.layer[0].attention.self.query
    quantizer = model._quantization_handle.weight_quantizers["bert.encoder.layer.0.attention.self.query.weight"]
    assert quantizer.x_max.shape == (query.out_features,)
    assert rows["bert.encoder.layer.0.attention.self.query.weight"]["kind"] == "weight"
    assert quantizer.x_max.shape != model._quantization_handle.weight_quantizers[
        "bert.encoder.layer.0.attention.output.LayerNorm.weight"].x_max.shape


def test_gpt2_conv1d_weights_per_output_channel() -> None:
    """GPT-2's Conv1D stores its weight as (in, out): each output column gets its own range (eq. 1 per channel)."""
    model = create_model("gpt2-tiny").eval()
    handle = quantize_(model, QuantConfig(per_channel_weights=True))
    calibrate(model, [tiny_batch("gpt2-tiny")])
    freeze(model)
    conv1d = {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 4 * 2 and all(f"{name}.weight" in handle.weight_quantizers for name in conv1d)
    assert all(f"{name}:linear" in handle.act_quantizers for name in conv1d)
    for name, module in conv1d.items():
        raw = module.parametrizations.weight.original.detach()
        scale = raw.abs().amax(dim=0) / 127  # symmetric, one scale per output column
        expected = torch.fake_quantize_per_channel_affine(raw, scale, torch.zeros_like(scale, dtype=torch.int32),
                                                          1, -128, 127)
        difference = (module.weight.detach() - expected).abs()
        assert (difference <= scale * 1.001).all()  # a wrong axis would be off by many steps
        assert (difference > 1e-6).float().mean() < 1e-3  # only rounding ties may land on the other grid point


def _quantized_logits(model, batches, config: QuantConfig) -> list[torch.Tensor]:
    handle = quantize_(model, config)
    calibrate(model, batches)
    freeze(model)
    with torch.no_grad():
        out = [model(**b).logits for b in batches]
    handle.remove()
    return out


def _relative_error(model, batches, config: QuantConfig = QuantConfig()) -> float:
    model.eval()
    with torch.no_grad():
        reference = [model(**b).logits for b in batches]
    quantized = _quantized_logits(model, batches, config)
    return sum(((q - r).norm() / r.norm()).item() for q, r in zip(quantized, reference)) / len(batches)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_16_bit_reproduces_floating_point(preset: str) -> None:
    model = create_model(preset).eval()
    batches = [tiny_batch(preset)]  # calibrated on the batch it is scored on: no clipping, only 16-bit rounding
    with torch.no_grad():
        before = model(**batches[0]).logits
    assert _relative_error(model, batches, QuantConfig(weight_bits=16, act_bits=16)) < 1e-3
    with torch.no_grad():  # removing the quantizers restores the FP model exactly
        assert torch.equal(model(**batches[0]).logits, before)
    assert not hasattr(model, "_quantization_handle")


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("layers", [2, 3])
def test_site_count_formula(preset: str, layers: int) -> None:
    model = create_model(preset, num_hidden_layers=layers).eval()
    handle = quantize_(model)
    family = preset.split("-")[0]
    assert len(handle.act_quantizers) == SITE_FORMULA[family](layers)
    kinds = Counter(handle.site_kinds.values())
    assert kinds["scores"] == kinds["probs"] == kinds["context"] == layers
    calibrate(model, [tiny_batch(preset)])
    freeze(model)  # raises if any installed site never saw data
    assert all(row["min"] is not None and row["min"] <= row["max"] for row in site_table(model))
    assert not any(name.startswith(("cls.", "lm_head", "classifier")) for name in handle.act_quantizers)


def test_filter_fn_selects_sites() -> None:
    """torchao-style ``filter_fn(module, name)``: a block left out gets no quantizer, the rest are unchanged."""
    model = create_model("llama-tiny").eval()
    everything = quantize_(model)
    all_acts, all_weights = list(everything.act_quantizers), list(everything.weight_quantizers)
    everything.remove()
    seen: list[tuple[type, str]] = []

    def not_block_0(module, name: str) -> bool:
        seen.append((type(module), name))
        return not name.startswith("model.layers.0.") and name != "model.layers.0"

    handle = quantize_(model, filter_fn=not_block_0)
    assert list(handle.act_quantizers) == [k for k in all_acts if not k.startswith(("model.layers.0.", "model.layers.0:"))]
    assert list(handle.weight_quantizers) == [k for k in all_weights if not k.startswith("model.layers.0.")]
    assert len(handle.act_quantizers) == SITE_FORMULA["llama"](1) and len(all_acts) == SITE_FORMULA["llama"](2)
    assert (LlamaAttention, "model.layers.1.self_attn") in seen  # the taps are offered with their attention module
    calibrate(model, [tiny_batch("llama-tiny")])
    freeze(model)


def test_head_and_gate_stay_floating_point_unless_asked() -> None:
    from quantizable.attention.spec import AttentionSpec

    model = create_model("opt-tiny", spec=AttentionSpec(gate_type="linear"))
    handle = quantize_(model)
    assert not any("attn_gate" in name or name.startswith("lm_head") for name in
                   [*handle.act_quantizers, *handle.weight_quantizers])
    handle.remove()
    handle = quantize_(model, QuantConfig(quantize_head=True))
    assert "lm_head:linear" in handle.act_quantizers and "lm_head.weight" in handle.weight_quantizers
    handle.remove()


@pytest.mark.parametrize("model_class,config", [
    (BertForMaskedLM, BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)),
    (LlamaForCausalLM, LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64)),
])
def test_stock_hf_models_get_attention_taps(model_class, config) -> None:
    model = model_class(config).eval()
    batch = tiny_batch("bert-tiny")
    previous = model.config._attn_implementation
    handle = quantize_(model, QuantConfig(weight_bits=16, act_bits=16))
    calibrate(model, [batch])
    freeze(model)
    probs = [row for row in site_table(model) if row["kind"] == "probs"]
    assert probs and all(0 <= row["max"] <= 1 for row in probs)
    handle.remove()
    assert model.config._attn_implementation == previous


def _plant_outlier(model, preset: str, batch) -> None:
    """One hidden dimension of one token becomes huge (the paper's 'no-op' outlier pattern)."""
    with torch.no_grad():
        if preset.startswith("vit"):
            model.vit.embeddings.position_embeddings[0, 5, 3] = 500.0
        else:
            model.get_input_embeddings().weight[int(batch["input_ids"][0, 3]), 3] = 500.0


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_planted_outlier_hurts_w8a8(preset: str) -> None:
    model = create_model(preset).eval()
    batches = [tiny_batch(preset, seed=s) for s in range(2)]
    clean = _relative_error(model, batches)
    _plant_outlier(model, preset, batches[0])
    assert _relative_error(model, batches) > 5 * clean


def test_simulate_w8a8_restores_model() -> None:
    model = create_model("opt-tiny").eval()
    batches = []
    for seed in range(3):
        batch = tiny_batch("opt-tiny", seed=seed)
        batches.append({**batch, "labels": batch["input_ids"]})
    results = simulate_w8a8(model, lambda seed: batches[seed:seed + 1], batches, seeds=[0, 1])
    assert results["metric"] == "perplexity" and results["sites"] == SITE_FORMULA["opt"](2)
    per_seed = results["quantized"]["per_seed"]
    assert len(per_seed) == 2 and math.isclose(results["quantized"]["std"], statistics.stdev(per_seed), abs_tol=1e-12)
    assert math.isclose(results["quantized"]["mean"], results["fp"], rel_tol=0.05)
    assert not hasattr(model, "_quantization_handle")
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    # a known FP score is reused, not measured again, and changes nothing else
    again = simulate_w8a8(model, lambda seed: batches[seed:seed + 1], batches, seeds=[0, 1],
                          fp={"metric": "perplexity", "value": -1.0})
    assert again["fp"] == -1.0 and again["quantized"]["per_seed"] == results["quantized"]["per_seed"]


def _run_dir(tmp_path, preset: str, **overrides):
    import yaml

    run = tmp_path / preset
    create_model(preset, **overrides).save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 32}}))
    return run



@pytest.mark.usefixtures("default_data")  # conftest: prepared once, never a silent skip
@pytest.mark.parametrize("preset,metric", [("bert-tiny", "perplexity"), ("opt-tiny", "perplexity"),
                                           ("vit-tiny", "accuracy")])
def test_cli_writes_results(tmp_path, capsys, preset: str, metric: str) -> None:
    from quantizable.cli.main import main

    run = _run_dir(tmp_path, preset, **({} if preset.startswith("vit") else {"vocab_size": 8192}))
    out = tmp_path / "out"
    argv = ["quantize", str(run), "--calib-batches", "2", "--seeds", "2", "--eval-batches", "2",
            "--batch-size", "4", "--estimator", "percentile:99.99", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == metric and results["sites"] == SITE_FORMULA[preset.split("-")[0]](2)
    assert set(results["quantized"]) == {"mean", "std", "per_seed"} and len(results["quantized"]["per_seed"]) == 2
    assert results["config"]["act_estimator"] == "percentile:99.99" and results["site_table"]
    assert results["fp"] > 0 and all(math.isfinite(v) for v in results["quantized"]["per_seed"])
    printed = capsys.readouterr().out  # a line as each stage finishes, not minutes of silence
    assert f"FP {metric}" in printed and "seed 0 (1/2)" in printed and "seed 1 (2/2)" in printed
    assert results["setup"]["name"] == "default"


@pytest.mark.parametrize("flags,message", [
    (["--weights", "1"], "--weights"),
    (["--acts", "17"], "--acts"),
    (["--estimator", "minmax2"], "unknown range estimator"),
    (["--calib-batches", "10000000"], "exceeds"),
])
@pytest.mark.usefixtures("default_data")  # conftest: prepared once, never a silent skip
def test_cli_bad_input(tmp_path, capsys, flags, message) -> None:
    from quantizable.cli.main import main

    run = _run_dir(tmp_path, "vit-tiny")
    assert main(["quantize", str(run), *flags, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("symmetric,bits,channel_axis", [(False, 8, None), (True, 8, None), (True, 4, 0),
                                                         (False, 16, None)])
def test_frozen_quantizer_matches_eq1(symmetric: bool, bits: int, channel_axis) -> None:
    from quantizable.quantization import FakeQuantizer

    x = torch.randn(6, 50) * torch.linspace(0.1, 3, 6)[:, None] + 0.3
    quantizer = FakeQuantizer(bits, symmetric, parse_estimator("current_minmax"), channel_axis)
    quantizer.set_state("estimate")
    quantizer(x)
    quantizer.set_state("frozen")
    x_min, x_max = quantizer.x_min, quantizer.x_max
    if channel_axis is not None:
        x_min, x_max = x_min[:, None], x_max[:, None]
    scale, zero_point, int_min, int_max = quant_params(x_min, x_max, bits, symmetric)
    textbook = (torch.clamp(torch.round(x / scale) + zero_point, int_min, int_max) - zero_point) * scale
    assert torch.allclose(quantizer(x), textbook, atol=1e-6)  # the clamp-first form equals eq. (1)
    fused, explicit = x.clone().requires_grad_(), x.clone().requires_grad_()
    quantizer(fused * 2).sum().backward()  # half the values fall outside the range: the STE blocks those
    fake_quantize(explicit * 2, x_min, x_max, bits, symmetric).sum().backward()
    assert 0 < int((fused.grad == 0).sum()) < x.numel() and torch.equal(fused.grad, explicit.grad)


def test_site_attribution_names_the_one_site_with_a_planted_outlier() -> None:
    """opt-tiny with one FFN hidden unit of layer 1 pushed to -1000 before its ReLU: only the fc1 output of that
    layer sees the outlier (ReLU zeroes it, fc2 never reads it), so quantizing that site alone, at a range that
    rounds every other unit to 0, must cost the most; and every other site alone costs little."""
    from quantizable.models import create_model
    from quantizable.quantization.attribution import site_attribution

    torch.manual_seed(0)
    model = create_model("opt-tiny").eval()
    fc1 = model.model.decoder.layers[1].fc1
    with torch.no_grad():
        fc1.bias[3] = -1000.0
        model.model.decoder.layers[1].fc2.weight[:, 3] = 0.0
        for layer in model.model.decoder.layers:  # a stronger FFN, so that losing it shows in the loss
            layer.fc2.weight.mul_(20)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 512, (4, 32), generator=g)), "labels": ids}
               for _ in range(2)]
    result = site_attribution(model, batches, lambda: batches, by="site")
    worst, runner_up = result["rows"][0], result["rows"][1]
    assert worst["group"] == "model.decoder.layers.1.fc1:linear"
    assert worst["max_abs_range"] >= 1000 and worst["loss"] > 5 * max(runner_up["loss"], 0.05)
    by_kind = site_attribution(model, batches, lambda: batches, by="kind")
    assert by_kind["rows"][0]["group"] == "linear"
    assert {row["group"] for row in by_kind["rows"]} >= {"weights only", "residual", "norm", "scores", "probs"}
    assert not hasattr(model, "_quantization_handle")  # restored to floating point


def test_quantize_cli_attribute_prints_and_writes_the_groups(tmp_path, capsys) -> None:
    import json

    from quantizable.cli.main import main as cli_main
    from quantizable.training import load_config, train

    run = tmp_path / "run"
    train(load_config("opt-tiny", ["run.steps=2", "data.seq_len=32"]), run, progress=False)
    assert cli_main(["quantize", str(run), "--seeds", "1", "--calib-batches", "1", "--batch-size", "4",
                     "--eval-batches", "2", "--attribute", "kind", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "alone, worst first:" in out and "residual (" in out
    assert "over 1 seed (" in out and "±" not in out  # one calibration seed: no spread to print
    attribution = json.loads((tmp_path / "q" / "results.json").read_text())["attribution"]
    assert attribution["by"] == "kind" and attribution["rows"][0]["loss"] >= attribution["rows"][-1]["loss"]
