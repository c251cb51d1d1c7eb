"""PTQ baselines (quantization.ptq): function preservation, per-token ranges, kept outlier channels, prefix."""

import json

import pytest
import torch
import yaml

from quantizable.models import create_model
from quantizable.quantization import FakeQuantizer, QuantConfig, calibrate, freeze, parse_estimator, quantize_
from quantizable.quantization.ptq import METHODS, parse_ptq, simulate_ptq
from tests.conftest import tiny_batch

FAMILIES = ("bert-tiny", "opt-tiny", "vit-tiny", "llama-tiny")


def _batches(preset: str, count: int = 2) -> list[dict[str, torch.Tensor]]:
    return [tiny_batch(preset, seed=seed) for seed in range(count)]


def _with_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """Give the norms a few large gains, so that smoothing and rotation have something to move."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "weight", None) is not None and type(module).__name__.endswith("Norm"):
                module.weight[:3] = 40.0
    return model.eval()


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("method", ["smoothquant", "rotation"])
def test_weight_transforms_keep_the_fp_function(preset: str, method: str) -> None:
    model = _with_outliers(create_model(preset))
    ptq = parse_ptq(method)
    if ptq.not_applicable(model) is not None:
        assert preset == "bert-tiny" and method == "rotation"  # post-LN: refused with a reason
        with pytest.raises(ValueError, match="pre-LN"):
            simulate_ptq(model, _batches(preset), _batches(preset), ptq)
        return
    batches = _batches(preset)
    target, details = ptq.prepare(model, batches, seed=3)
    assert target is not model
    probe = tiny_batch(preset, seed=7)  # not a calibration batch
    with torch.no_grad():
        reference, transformed = model(**probe).logits, target(**probe).logits
    assert float((transformed - reference).norm() / reference.norm()) < 1e-4
    if method == "rotation":  # the weights really changed: a reader of the first norm is rotated
        first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        assert not torch.allclose(model.get_submodule(first).weight, target.get_submodule(first).weight)
        assert details["norms_folded"] > 0
    else:
        assert details["groups"] > 0


def test_per_token_ranges_differ_per_token() -> None:
    x = torch.randn(1, 4, 32) * torch.tensor([0.01, 1.0, 10.0, 300.0])[None, :, None]
    quantizer = FakeQuantizer(8, False, parse_estimator("running_minmax"))
    quantizer.configure(per_token=True)
    quantizer.set_state("estimate")
    quantizer(x)
    quantizer.set_state("frozen")
    out = quantizer(x)
    # reference: torch's per-channel fake quantization with one channel per token
    flat = x.reshape(4, 32)
    low, high = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
    scale = (high - low) / 255
    zero = torch.round(-low / scale).clamp(0, 255).int()
    expected = torch.fake_quantize_per_channel_affine(flat, scale, zero, 0, 0, 255)
    torch.testing.assert_close(out.reshape(4, 32), expected, rtol=0, atol=1e-5 * 300)
    steps = [float((out[0, t] - x[0, t]).abs().max()) for t in range(4)]
    assert steps[0] < steps[1] < steps[2] < steps[3]  # each token on its own grid
    static = FakeQuantizer(8, False, parse_estimator("running_minmax"))
    static.set_state("estimate")
    static(x)
    static.set_state("frozen")
    assert float((static(x)[0, 0] - x[0, 0]).abs().max()) > 100 * steps[0]


def test_outlier_fp_keeps_exactly_k_channels() -> None:
    model = _with_outliers(create_model("llama-tiny"))
    batches = _batches("llama-tiny")
    handle = quantize_(model, QuantConfig())
    try:
        details = parse_ptq("outlier_fp:5").configure(handle, batches, {})
        kept = {key: q.kept_channels for key, q in handle.act_quantizers.items() if q.kept_channels is not None}
        assert len(kept) == details["sites_with_kept_channels"] and details["kept_channels_total"] == 5 * len(kept)
        assert all(channels.numel() == 5 and channels.unique().numel() == 5 for channels in kept.values())
        calibrate(model, batches)
        freeze(model)
        key = next(iter(kept))
        quantizer = handle.act_quantizers[key]
        x = torch.randn(2, 7, quantizer.channel_absmax.numel()) * 3
        out = quantizer(x)
        unchanged = (out == x).all(dim=0).all(dim=0)
        assert unchanged.sum() == 5 and unchanged[kept[key]].all()
    finally:
        handle.remove()


def test_outlier_fp_channels_are_left_out_of_the_range() -> None:
    quantizer = FakeQuantizer(8, False, parse_estimator("current_minmax"))
    quantizer.configure(kept_channels=torch.tensor([2]))
    quantizer.set_state("estimate")
    x = torch.randn(2, 5, 8)
    x[..., 2] = 1000.0
    quantizer(x)
    assert float(quantizer.x_max) < 10


def test_prefix_leaves_position_0_out_of_every_static_range() -> None:
    model = create_model("opt-tiny").eval()
    batches = _batches("opt-tiny")
    handle = quantize_(model, QuantConfig())
    try:
        parse_ptq("prefix").configure(handle, batches, {})
        assert all(q.skip_positions == 1 for q in handle.act_quantizers.values())
        length = batches[0]["input_ids"].shape[1]

        def first(x):  # position 0 of a site's tensor: axis T of (B, T, D) / (B, H, T, .), rows i % T == 0 of (B*T, D)
            return torch.arange(x.shape[0]) % length == 0 if x.dim() == 2 else (slice(None),) * (x.dim() - 2) + (0,)

        def massive(module, args):  # the quantizer sees 1e6 at position 0 ...
            x = args[0].clone()
            module.original = x[first(x)].clone()
            x[first(x)] = 1e6
            return (x,)

        def restore(module, args, out):  # ... and later sites see the true values, so nothing else grows
            out = out.clone()
            out[first(out)] = module.original
            return out

        for q in handle.act_quantizers.values():
            q.register_forward_pre_hook(massive)
            q.register_forward_hook(restore)
        calibrate(model, batches)
        wide = {key: (float(q.x_min), float(q.x_max)) for key, q in handle.act_quantizers.items() if float(q.x_max) >= 1e5}
        assert not wide, wide
    finally:
        handle.remove()
    quantizer = FakeQuantizer(8, False, parse_estimator("running_minmax"))
    quantizer.configure(skip_positions=1)
    quantizer.set_state("estimate")
    x = torch.randn(2, 6, 16)
    x[:, 0] = 5000.0  # a massive first token
    out = quantizer(x)
    assert float(quantizer.x_max) < 10 and torch.equal(out[:, 0], x[:, 0])
    probs = torch.rand(2, 3, 6, 6)
    probs[:, :, 0] = 50.0  # (B, H, T, T): the query axis is the token axis
    quantizer.reset()
    quantizer(probs)
    assert float(quantizer.x_max) <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(method: str) -> None:
    for preset in FAMILIES:
        model = create_model(preset)
        ptq = parse_ptq(method)
        if ptq.not_applicable(model) is not None:
            continue
        batches = [{**b, "labels": b.get("input_ids", torch.zeros(2, dtype=torch.long))} for b in _batches(preset)]
        result = simulate_ptq(model, batches, batches, ptq, seeds=(0, 1))
        assert len(result["quantized"]["per_seed"]) == 2 and result["ptq"]["method"] == method
        assert all(v == v for v in result["quantized"]["per_seed"])  # not NaN
        assert {"extra_params", "runtime", "backend"} <= set(result["cost"])
        # the keys of results files written before the registry (docs/results/ptq/*.json)
        assert set(result) == {"metric", "fp", "quantized", "seeds", "ptq", "cost", "details", "config"}


@pytest.mark.parametrize("text,message", [("bogus", "valid: smoothquant"), ("rotation:3", "takes no value"),
                                          ("smoothquant:2", "ALPHA"), ("outlier_fp:x", "not a whole number")])
def test_bad_ptq_names(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ptq(text)
    assert parse_ptq("smoothquant:0.8").alpha == 0.8 and parse_ptq("outlier_fp:16").name == "outlier_fp:16"


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_method_round_trips_through_its_name(method: str) -> None:
    """Text -> config -> text for each method of the registry, with and without its parameter; the config carries
    its cost description and serialises with its own parameter's value."""
    default = parse_ptq(method)
    assert parse_ptq(default.name) == default and default.cost["runtime"] and default.to_dict()["method"] == method
    field = default.parameter()
    if field is not None:
        value = {"alpha": 0.25, "k": 3, "positions": 2}[field.name]
        configured = parse_ptq(f"{method}:{value}")
        assert getattr(configured, field.name) == value and parse_ptq(configured.name) == configured
        assert configured.to_dict()[field.name] == value
    if method == "smoothquant":  # names keep every digit of the value (they key results)
        assert parse_ptq("smoothquant:1").name == "smoothquant:1"
        assert parse_ptq(parse_ptq("smoothquant:0.123456789").name).alpha == 0.123456789
    # one ``ptq`` record shape for every method, as results files have it
    assert list(default.to_dict()) == ["name", "method", "alpha", "k", "positions"]


@pytest.mark.parametrize("text,message", [
    ("outlier_fp:0", r"outlier_fp K must be at least 1, got 0 \(outlier_fp\[:K\]\)"),
    ("prefix:0", r"prefix N must be at least 1, got 0 \(prefix\[:N\]\)"),
    ("prefix:1.5", r"prefix: '1.5' is not a whole number \(prefix\[:N\]\)"),
    ("smoothquant:-1", r"smoothquant ALPHA must be in \[0, 1\], got -1 \(smoothquant\[:ALPHA\]\)"),
    ("smoothquant:x", r"smoothquant: 'x' is not a number \(smoothquant\[:ALPHA\]\)"),
    ("rotation:3", r"PTQ method rotation takes no value, got 'rotation:3' \(rotation\)"),
    ("bogus", r"valid: smoothquant\[:ALPHA\], rotation, per_token, outlier_fp\[:K\], prefix\[:N\]$")])
def test_a_bad_parameter_names_the_method_and_what_it_takes(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ptq(text)


def test_cli_ptq(tmp_path, capsys) -> None:
    from quantizable.cli.main import main

    run = tmp_path / "run"
    create_model("vit-tiny").save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 32}}))
    out = tmp_path / "out"
    assert main(["quantize", str(run), "--ptq", "bogus", "--out", str(out)]) == 2
    assert "valid: smoothquant" in capsys.readouterr().err
    argv = ["quantize", str(run), "--ptq", "smoothquant:0.7", "--calib-batches", "2", "--seeds", "1",
            "--eval-batches", "2", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ptq"]["ptq"]["alpha"] == 0.7 and len(results["ptq"]["quantized"]["per_seed"]) == 1


@pytest.mark.slow
def test_reproduce_ptq_field_report_and_reuse(tmp_path, capsys) -> None:
    from quantizable.experiments import reproduce

    with pytest.raises(ValueError, match="valid: smoothquant"):
        reproduce(tmp_path, "tiny", ("opt",), ("vanilla",), progress=False, ptq=("bogus",))
    rows = reproduce(tmp_path, "tiny", ("opt",), ("vanilla",), progress=False, ptq=("smoothquant", "prefix"))
    (row,) = rows
    assert set(row["ptq"]) == {"smoothquant:0.5", "prefix:1"}
    assert row["ptq"]["smoothquant:0.5"]["w8a8"]["n"] == 1 and row["ptq"]["prefix:1"]["cost"]["runtime"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["ptq"] == json.loads(json.dumps(row["ptq"]))
    report = (tmp_path / "report.md").read_text()
    assert "## Architecture fix vs PTQ fix" in report and "+ smoothquant:0.5" in report
    assert (tmp_path / "ptq.png").is_file()
    capsys.readouterr()
    again = reproduce(tmp_path, "tiny", ("opt",), ("vanilla",), progress=False, ptq=("prefix",))
    assert "reusing" in capsys.readouterr().out and set(again[0]["ptq"]) == {"prefix:1"}


def test_rotation_refuses_gated_attention() -> None:
    from quantizable import AttentionSpec
    from quantizable.quantization.ptq import NotApplicable

    model = create_model("opt-tiny", AttentionSpec(kind="gated_attention")).eval()
    with pytest.raises(NotApplicable, match="gates"):  # the gates read the norm output per head
        parse_ptq("rotation").prepare(model, _batches("opt-tiny"), 0)
    target, _ = parse_ptq("smoothquant").prepare(model, _batches("opt-tiny"), 0)  # smoothing leaves the gates' input
    assert target is not model
