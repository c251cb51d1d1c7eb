"""ViT registers (``model.registers``, issue 33): appended to the patches, attended to, never pooled, left out of
the outlier metrics, saved and loaded, quantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageClassification

from quantizable.analysis import analyze
from quantizable.analysis.metrics import inf_norm, kurtosis
from quantizable.models import create_model, load_model
from quantizable.training import TrainConfig, load_config, train
from tests.conftest import tiny_batch

torch.set_num_threads(1)

REGISTERS = 4
TOKENS = 1 + (28 // 7) ** 2  # vit-tiny: [CLS] + 16 patches


def _model_with_registers(scale: float = 1.0) -> torch.nn.Module:
    """A tiny ViT whose registers are far from their near-zero initialisation, so they matter in every test."""
    model = create_model("vit-tiny", registers=REGISTERS).eval()
    with torch.no_grad():
        model.vit.embeddings.register_tokens.normal_(0.0, scale)
    return model


@torch.no_grad()
def test_registers_are_attended_to_but_the_head_sees_only_cls() -> None:
    model = _model_with_registers()
    batch = tiny_batch("vit-tiny")
    vit = model.vit
    # by hand: [CLS] + patches + positions, then the registers as they are (no position embedding) at the end
    embedded = vit.embeddings(**batch)
    assert embedded.shape[1] == TOKENS + REGISTERS
    torch.testing.assert_close(embedded[:, TOKENS:], vit.embeddings.register_tokens.expand(2, -1, -1),
                               atol=0, rtol=0)
    hidden = embedded
    for layer in vit.layers:
        hidden = layer(hidden)
    sequence = vit.layernorm(hidden)
    output = vit(**batch)
    assert output.last_hidden_state.shape[1] == TOKENS  # dropped at the output
    torch.testing.assert_close(output.last_hidden_state, sequence[:, :TOKENS], atol=0, rtol=0)
    assert vit(**batch, return_dict=False)[0].shape[1] == TOKENS
    pooled = []
    model.classifier.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    logits = model(**batch).logits
    torch.testing.assert_close(pooled[0], sequence[:, 0], atol=0, rtol=0)  # [CLS], not a register
    torch.testing.assert_close(logits, model.classifier(sequence[:, 0]), atol=0, rtol=0)
    # the registers are in the attention: other register values, other logits
    vit.embeddings.register_tokens.mul_(3.0)
    assert not torch.allclose(model(**batch).logits, logits)


def test_registers_start_near_zero_learn_and_leave_the_other_weights_alone() -> None:
    torch.manual_seed(0)
    plain = create_model("vit-tiny")
    torch.manual_seed(0)
    model = create_model("vit-tiny", registers=REGISTERS)
    registers = model.vit.embeddings.register_tokens
    assert registers.shape == (1, REGISTERS, 64) and 0 < registers.abs().max() < 1e-4  # DINOv2's init, std 1e-6
    own = {n: p for n, p in model.state_dict().items() if n != "vit.embeddings.register_tokens"}
    assert own.keys() == plain.state_dict().keys()
    assert all(torch.equal(p, plain.state_dict()[n]) for n, p in own.items())  # drawn after everything else
    batch = tiny_batch("vit-tiny")
    model(**batch, labels=torch.tensor([1, 2])).loss.backward()
    assert registers.grad is not None and registers.grad.abs().sum() > 0


def test_outlier_metrics_leave_the_registers_out_and_report_them_apart() -> None:
    model = _model_with_registers(scale=50.0)  # high-norm registers: they would dominate every metric
    batches = [tiny_batch("vit-tiny", batch=3, seed=s) for s in (1, 2)]
    blocks: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: blocks.setdefault(i, []).append(out))
             for i, layer in enumerate(model.vit.layers)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    result = analyze(model, batches)

    def per_layer(tokens: slice, statistic) -> list[float]:  # mean over images of the per-image statistic
        return [torch.tensor([statistic(x[tokens].reshape(-1)) for out in outs for x in out.double()]).mean().item()
                for _, outs in sorted(blocks.items())]

    tokens, registers = slice(0, TOKENS), slice(TOKENS, None)
    assert result["sequences"] == 6
    assert result["max_inf_norm"] == pytest.approx(max(per_layer(tokens, inf_norm)), rel=1e-6)
    layers = per_layer(tokens, kurtosis)
    assert result["avg_kurtosis"] == pytest.approx(sum(layers) / len(layers), rel=1e-6)
    expected = per_layer(registers, inf_norm)
    assert result["registers"]["count"] == REGISTERS
    assert result["registers"]["per_layer_inf_norm"] == pytest.approx(expected, rel=1e-6)
    assert result["registers"]["max_inf_norm"] == pytest.approx(max(expected), rel=1e-6)
    assert result["registers"]["max_inf_norm"] > 10 * result["max_inf_norm"]
    assert all(position < TOKENS for position, _ in result["outliers"]["positions"])
    assert all(row["max_inf_norm"] < result["registers"]["max_inf_norm"] for row in result["per_layer"])
    assert analyze(create_model("vit-tiny").eval(), batches[:1])["registers"] is None


def test_registers_round_trip_through_save_and_load(tmp_path: Path) -> None:
    model = _model_with_registers()
    batch = tiny_batch("vit-tiny")
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["registers"] == REGISTERS
    for loaded in (load_model(tmp_path / "model"), AutoModelForImageClassification.from_pretrained(tmp_path / "model")):
        assert type(loaded).__name__ == "QuantizableViTForImageClassification"
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**batch).logits, logits, atol=0, rtol=0)


def test_rotation_rotates_the_registers_with_cls_and_positions() -> None:
    from quantizable.quantization.transforms import rotate_

    model = _model_with_registers()
    result = rotate_(model, [tiny_batch("vit-tiny")])  # refuses when the logits change
    assert result["fp_relative_change"] < 1e-4


def test_registers_setting_is_validated_and_round_trips_through_the_config() -> None:
    config = load_config("vit-tiny", ["model.registers=4"])
    assert config.model.registers == 4 and config.model.structure() == {"registers": 4}
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert load_config("vit-tiny").model.structure() == {}
    with pytest.raises(ValueError, match="model.registers must be >= 0"):
        load_config("vit-tiny", ["model.registers=-1"])
    with pytest.raises(ValueError, match="model.registers has the wrong type"):
        load_config("vit-tiny", ["model.registers=1.5"])
    with pytest.raises(ValueError, match="only vit supports them"):
        create_model("opt-tiny", registers=2)
    with pytest.raises(ValueError, match="model.registers must be an integer >= 0"):
        create_model("vit-tiny", registers=-3)


@pytest.mark.usefixtures("default_data")  # conftest: the embedded images, prepared once
def test_training_and_the_quantize_cli_on_a_model_with_registers(tmp_path: Path) -> None:
    from quantizable.cli.main import main

    config = load_config("vit-tiny", ["model.registers=2", "run.steps=2", "run.batch_size=8"])
    train(config, tmp_path / "run", progress=False)
    assert load_model(tmp_path / "run").config.registers == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["registers"] == 2
    with pytest.raises(ValueError, match="only vit supports them"):
        train(load_config("opt-tiny", ["model.registers=2", "run.steps=1"]), tmp_path / "opt", progress=False)
    out = tmp_path / "quantized"
    assert main(["quantize", str(tmp_path / "run"), "--calib-batches", "2", "--seeds", "1", "--eval-batches", "2",
                 "--batch-size", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "accuracy" and 0 <= results["quantized"]["mean"] <= 100
    assert results["sites"] == 14 * 2 + 3  # the same sites as without registers (test_quantization.SITE_FORMULA)
