"""The ``paper`` quantization setup against formulas written from the official code's description
(../shared/reference/reference-implementation-and-field.md, section 4.3) and against torch's own fake-quantize ops."""

from collections import Counter

import pytest
import torch

from quantizable import AttentionSpec, create_model
from quantizable.quantization import QuantConfig, calibrate, freeze, quantize_
from quantizable.quantization.estimators import parse_estimator
from quantizable.quantization.quantizers import FakeQuantizer
from quantizable.quantization.setups import SETUPS, UnsignedWhenNonNegative, get_setup
from tests.conftest import TINY_PRESETS, tiny_batch

PAPER = QuantConfig(setup="paper")

# Official placement (output quantizers): per block Q, K, V, scores, probs, context, attention output, residual,
# LN, FFN-in + activation (one fused site), FFN out, residual, LN = 13; BERT adds the two embedding sums and the
# embedding LN (3), OPT the embedding sum and the final LN (2).
OFFICIAL_FORMULA = {"bert": lambda L: 13 * L + 3, "opt": lambda L: 13 * L + 2}


@pytest.mark.parametrize("family", sorted(OFFICIAL_FORMULA))
@pytest.mark.parametrize("layers", [2, 3])
def test_paper_site_counts_match_the_official_code(family: str, layers: int) -> None:
    model = create_model(f"{family}-tiny", num_hidden_layers=layers).eval()
    handle = quantize_(model, PAPER)
    assert len(handle.act_quantizers) == OFFICIAL_FORMULA[family](layers)
    kinds = Counter(handle.site_kinds.values())
    assert kinds["activation"] == layers and kinds["partial_embedding_sum"] == (family == "bert")
    ffn_inputs = {"bert": "intermediate.dense", "opt": "fc1"}[family]
    assert not any(name.endswith(f"{ffn_inputs}:linear") for name in handle.act_quantizers)
    default = quantize_(create_model(f"{family}-tiny", num_hidden_layers=layers))
    assert len(default.weight_quantizers) == len(handle.weight_quantizers)  # weight sites are equal (8L+4, 8L+3)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_paper_setup_calibrates_every_family(preset: str) -> None:
    model = create_model(preset, AttentionSpec(kind="gated_attention")).eval()
    with torch.no_grad():
        reference = model(**tiny_batch(preset)).logits
    handle = quantize_(model, PAPER)
    calibrate(model, [tiny_batch(preset, seed=1)])
    freeze(model)
    with torch.no_grad():
        quantized = model(**tiny_batch(preset)).logits
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, reference)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch(preset)).logits, reference)


def test_unsigned_grid_for_non_negative_weights() -> None:
    """All-positive LayerNorm gamma: the paper setup uses 0..255 (torch's per-tensor op with zero point 0)."""
    model = create_model("bert-tiny").eval()
    norm = model.bert.encoder.layer[0].output.LayerNorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.7, norm.weight.numel()))
        norm.weight[3] = 0.5 + 1.2 * 0.41  # no value on a rounding tie
    handle = quantize_(model, PAPER)
    calibrate(model, [tiny_batch("bert-tiny")])
    freeze(model)
    quantizer = handle.weight_quantizers["bert.encoder.layer.0.output.LayerNorm.weight"]
    assert isinstance(quantizer, UnsignedWhenNonNegative)
    raw = norm.parametrizations.weight.original.detach()
    scale = float(raw.max()) / 255
    expected = torch.fake_quantize_per_tensor_affine(raw, scale, 0, 0, 255)
    torch.testing.assert_close(norm.weight.detach(), expected, atol=1e-6, rtol=0)
    signed = torch.fake_quantize_per_tensor_affine(raw, float(raw.max()) / 127, 0, -128, 127)
    assert (norm.weight.detach() - raw).pow(2).mean() < (signed - raw).pow(2).mean() / 2  # about 4x less error
    # a weight with negative values keeps the signed grid
    dense = model.bert.encoder.layer[0].output.dense
    raw = dense.parametrizations.weight.original.detach()
    expected = torch.fake_quantize_per_tensor_affine(raw, float(raw.abs().max()) / 127, 0, -128, 127)
    assert (dense.weight.detach() - expected).abs().max() <= float(raw.abs().max()) / 127 * 1.001


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizer_matches_torch_fake_quantize(symmetric: bool) -> None:
    """Our eq. (1) against torch.fake_quantize_per_tensor_affine, on values away from rounding ties."""
    torch.manual_seed(3)
    x = torch.randn(4000) * 2 + (0 if symmetric else 1.5)
    quantizer = FakeQuantizer(8, symmetric, parse_estimator("current_minmax"))
    quantizer.set_state("estimate")
    quantizer(x)
    quantizer.set_state("frozen")
    x_min, x_max = min(float(quantizer.x_min), 0.0), max(float(quantizer.x_max), 0.0)
    if symmetric:
        scale, zero_point, low, high = max(-x_min, x_max) / 127, 0, -128, 127
    else:
        scale = (x_max - x_min) / 255
        zero_point, low, high = int(round(-x_min / scale)), 0, 255
    away = ((x / scale) - (x / scale).floor() - 0.5).abs() > 1e-3
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, low, high)
    torch.testing.assert_close(quantizer(x)[away], expected[away], atol=1e-6, rtol=0)


def _grid_residual(values: torch.Tensor, quantizer: FakeQuantizer) -> float:
    """How far ``values`` are from the quantizer's grid, in steps (0 on the grid)."""
    scale, low, _ = quantizer._grid()
    steps = (values - low) / scale
    return float((steps - steps.round()).abs().max())


@pytest.mark.parametrize("setup, on_grid", [("paper", True), ("default", False)])
def test_paper_residual_add_uses_the_quantized_sum(setup: str, on_grid: bool) -> None:
    """Pre-LN OPT: block output = mid-block residual + FFN output. Under the paper setup the residual term is the
    quantized sum the final_layer_norm site sees, so block output - quantized FFN output lies on that site's grid."""
    model = create_model("opt-tiny").eval()
    handle = quantize_(model, QuantConfig(setup=setup))
    calibrate(model, [tiny_batch("opt-tiny", seed=s) for s in range(2)])
    freeze(model)
    handle.act_quantizers["model.decoder.layers.0:residual"].set_state("off")  # see the block's own sum
    layer = model.model.decoder.layers[0]
    seen: dict[str, torch.Tensor] = {}
    block_output = lambda m, a, out: seen.__setitem__("block", (out[0] if isinstance(out, tuple) else out).clone())
    hooks = [layer.fc2.register_forward_hook(lambda m, a, out: seen.__setitem__("ffn", out.clone())),
             layer.register_forward_hook(block_output)]
    with torch.no_grad():
        model(**tiny_batch("opt-tiny", seed=5))
    for hook in hooks:
        hook.remove()
    residual = seen["block"].reshape(-1, seen["block"].shape[-1]) - seen["ffn"]
    quantizer = handle.act_quantizers["model.decoder.layers.0.final_layer_norm:residual"]
    distance = _grid_residual(residual, quantizer)
    assert (distance < 0.02) if on_grid else (distance > 0.1), distance


def test_paper_opt_context_tapped_before_the_gate() -> None:
    gated = AttentionSpec(kind="gated_attention")
    for setup, tap in (("paper", "ungated_context"), ("default", "context")):
        model = create_model("opt-tiny", gated).eval()
        quantize_(model, QuantConfig(setup=setup))
        taps = model.model.decoder.layers[0].self_attn.attention_taps
        other = ({"ungated_context", "context"} - {tap}).pop()
        assert tap in taps and other not in taps
    bert = create_model("bert-tiny", gated)
    quantize_(bert, PAPER)  # the official BERT quantizes after the gate
    assert "context" in bert.bert.encoder.layer[0].attention.self.attention_taps


def test_paper_bert_partial_embedding_sum_on_grid() -> None:
    """word + token-type embeddings, before the positions are added, lie on the partial-sum site's grid."""
    model = create_model("bert-tiny").eval()
    handle = quantize_(model, PAPER)
    batch = tiny_batch("bert-tiny")
    calibrate(model, [batch])
    freeze(model)
    embeddings = model.bert.embeddings
    seen: dict[str, torch.Tensor] = {}
    hooks = [embeddings.word_embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("w", out)),
             embeddings.token_type_embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("t", out))]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    quantizer = handle.act_quantizers["bert.embeddings.token_type_embeddings:partial_embedding_sum"]
    assert _grid_residual(seen["w"] + seen["t"], quantizer) < 0.02


def test_setups_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown quantization setup 'paperr'; known: default, paper"):
        QuantConfig(setup="paperr")
    assert set(SETUPS) == {"default", "paper"}
    assert get_setup("paper").calibration_for("opt").act_estimator == "percentile:99.999"
    assert get_setup("paper").calibration_for("bert").weight_estimator == "current_minmax"


def test_official_kurtosis_against_plain_python() -> None:
    """The official per-row kurtosis, recomputed with the statistics module (unbiased stdev, + 1e-6)."""
    import statistics

    from quantizable.analysis.paper_metrics import official_kurtosis

    torch.manual_seed(1)
    rows = torch.randn(3, 257, dtype=torch.float64) ** 3 * torch.tensor([[0.01], [1.0], [30.0]], dtype=torch.float64)
    for row, ours in zip(rows.tolist(), official_kurtosis(rows).tolist()):
        mean = statistics.fmean(row)
        expected = statistics.fmean((v - mean) ** 4 for v in row) / (statistics.stdev(row) ** 4 + 1e-6)
        assert ours == pytest.approx(expected, rel=1e-9)
    # the 1e-6 makes it scale-dependent: a tiny tensor's kurtosis collapses, ours (population, no eps) does not
    from quantizable.analysis import kurtosis

    tiny = rows[:1] * 1e-3
    assert float(official_kurtosis(tiny)) < 0.1 * kurtosis(tiny)


@pytest.mark.parametrize("family, tensors", [("bert", lambda L: 2 * L), ("opt", lambda L: 5 * L + 1)])
def test_paper_metrics_pool_the_official_tensors(family: str, tensors) -> None:
    from quantizable.analysis import analyze

    model = create_model(f"{family}-tiny", num_hidden_layers=3).eval()
    batch = tiny_batch(f"{family}-tiny", batch=3)
    result = analyze(model, [batch])
    paper = result["paper_metrics"]
    assert paper["tensors"] == tensors(3)
    if family == "opt":  # the official "max layer inf norm" is our max inf norm (block outputs, per sequence)
        assert paper["max_layer_inf_norm"] == pytest.approx(result["max_inf_norm"], rel=1e-5)
    else:
        assert paper["max_ln_output_inf_norm"] == pytest.approx(result["max_inf_norm"], rel=1e-5)
    assert analyze(create_model("llama-tiny").eval(), [tiny_batch("llama-tiny")])["paper_metrics"] is None


def test_paper_setup_scores_a_short_context_run_at_its_trained_length(tmp_path) -> None:
    """The paper's OPT calibration shape is 1 x 512; a run trained at 32 tokens is calibrated and scored at 32, so
    its FP score is the default setup's (the same batch shape given to both: the same 32-token blocks)."""
    import json

    from quantizable.cli.main import main as cli_main
    from quantizable.training import load_config, train

    run = tmp_path / "run"
    train(load_config("opt-tiny", ["run.steps=2", "data.seq_len=32"]), run, progress=False)
    fp = {}
    for setup in ("default", "paper"):
        out = tmp_path / setup
        assert cli_main(["quantize", str(run), "--setup", setup, "--seeds", "1", "--calib-batches", "1",
                         "--batch-size", "4", "--eval-batches", "2", "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["setup"]["seq_len"] in (None, 32)
        fp[setup] = results["fp"]
    assert fp["paper"] == pytest.approx(fp["default"], rel=1e-5)
