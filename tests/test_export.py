"""Real INT8 export: ONNX and PT2E graphs of every family and attention variant, INT8 close to FP32, CLI and bad
input."""

import json
import math
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType

from quantizable.attention.spec import spec_for_method
from quantizable.export import export_int8, export_onnx, quantize_onnx, session
from quantizable.benchmarking import SPEED_FLAGS
from quantizable.export.onnx import weight_type as weight_type_of_cpu
from quantizable.models import create_model, load_model
from tests.conftest import tiny_batch

CASES = [("opt-tiny", "clipped_softmax"), ("opt-tiny", "gated_attention"), ("bert-tiny", "clipped_softmax"),
         ("bert-tiny", "gated_attention"), ("vit-tiny", "vanilla"), ("vit-tiny", "gated_attention"),
         ("llama-tiny", "softmax_plus_one"), ("gpt2-tiny", "gated_attention"), ("qwen2-tiny", "clipped_softmax")]


def _saved_model(tmp_path, preset: str, method: str):
    """Round-trip through save_pretrained, the way the CLI meets models."""
    create_model(preset, spec_for_method(method)).save_pretrained(tmp_path / "model")
    return load_model(tmp_path / "model").eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _ort_logits(path, batch) -> torch.Tensor:
    (logits,) = session(path).run(["logits"], {k: v.numpy() for k, v in batch.items()})
    return torch.from_numpy(logits)


@pytest.mark.slow
@pytest.mark.parametrize("preset,method", CASES)
def test_int8_logits_close_to_fp32(tmp_path, preset: str, method: str) -> None:
    model = _saved_model(tmp_path, preset, method)
    fp32 = export_onnx(model, tiny_batch(preset), tmp_path / "fp32.onnx")
    calibration = [tiny_batch(preset, batch=4, seed=seed) for seed in range(1, 4)]
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", calibration)
    # a batch and length other than the exported example: the axes are dynamic
    batch = tiny_batch(preset, batch=3, length=24, seed=7)
    reference = _logits(model, batch)
    fp32_logits, int8_logits = _ort_logits(fp32, batch), _ort_logits(int8, batch)
    assert fp32_logits.shape == int8_logits.shape == reference.shape
    torch.testing.assert_close(fp32_logits, reference, atol=1e-4, rtol=1e-4)
    relative = (int8_logits - reference).norm() / reference.norm()
    assert 0 < relative < 0.15, relative
    # INT8 really is in the graph: quantized weights and quantize/dequantize pairs
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops
    weight_type = onnx.TensorProto.INT8 if weight_type_of_cpu() == QuantType.QInt8 else onnx.TensorProto.UINT8
    assert any(init.data_type == weight_type and "weight" in init.name for init in graph.initializer)
    # the attention mask (finfo.min fill) is not quantized: every scale is finite and sane
    scales = {node.input[1] for node in graph.node if node.op_type == "QuantizeLinear"}
    values = [numpy_helper.to_array(init) for init in graph.initializer if init.name in scales]
    assert values and all(0 < float(v.max()) < 1e3 for v in values)


def _text_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    batches = [tiny_batch("opt-tiny", batch=4, seed=seed + i) for i in range(count)]
    return [{**batch, "labels": batch["input_ids"]} for batch in batches]


@pytest.mark.parametrize("simulate", [False, True])
def test_export_int8_reports_quality_and_latency(tmp_path, simulate: bool) -> None:
    model = create_model("opt-tiny", spec_for_method("clipped_softmax")).eval()
    evaluation = _text_batches(2, seed=100)
    result = export_int8(model, _text_batches(3, seed=0), lambda: evaluation, tmp_path, repeats=3,
                         simulate=simulate)
    assert result["metric"] == "perplexity" and result["backend"] == "onnxruntime"
    for name in ("fp32", "int8"):
        assert math.isfinite(result[name]["metric"]) and result[name]["latency_ms"] > 0
    # random init: perplexity near the vocabulary size, INT8 within a few percent of FP32
    assert abs(result["int8"]["metric"] / result["fp32"]["metric"] - 1) < 0.05
    assert result["speedup"] == pytest.approx(result["fp32"]["latency_ms"] / result["int8"]["latency_ms"])
    assert (tmp_path / result["files"]["int8"]).exists()
    cpuinfo = Path("/proc/cpuinfo")  # the speed-up depends on the machine's flags: recorded beside it, all of them
    if cpuinfo.is_file():
        line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
        assert set(result["cpu_flags"]) == set(line.split(":", 1)[1].split()) & set(SPEED_FLAGS)
    assert ("simulated_w8a8" in result) == simulate
    if simulate:  # the PyTorch and ORT FP32 graphs compute the same perplexity
        assert result["simulated_w8a8"]["torch_fp"] == pytest.approx(result["fp32"]["metric"], rel=1e-4)


def test_export_int8_bad_input(tmp_path) -> None:
    model = create_model("opt-tiny").eval()
    batches = _text_batches(1, seed=0)
    with pytest.raises(ValueError, match="backend"):
        export_int8(model, batches, lambda: batches, tmp_path, backend="tensorrt")
    with pytest.raises(ValueError, match="calibration"):
        export_int8(model, [], lambda: batches, tmp_path)
    with pytest.raises(ValueError, match="evaluation"):
        export_int8(model, batches, lambda: [], tmp_path)
    with pytest.raises(ValueError, match="no model inputs"):
        export_onnx(model, {"labels": batches[0]["labels"]}, tmp_path / "x.onnx")



def _vit_run(tmp_path, method: str):
    """A run directory holding a tiny ViT with ``method`` (images need no tokenizer)."""
    import yaml

    run = tmp_path / "run"
    create_model("vit-tiny", spec_for_method(method)).save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {}}))
    return run


@pytest.mark.usefixtures("default_data")  # conftest: prepared once, never a silent skip
def test_cli_writes_int8_json(tmp_path) -> None:
    from quantizable.cli.main import main

    run = _vit_run(tmp_path, "gated_attention")
    out = tmp_path / "out"
    argv = ["export", str(run), "--int8", "--calib-batches", "2", "--eval-batches", "2", "--batch-size", "4",
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "int8.json").read_text())
    assert result["metric"] == "accuracy" and result["eval_count"] == 8
    assert {"fp32", "int8", "speedup", "backend", "simulated_w8a8"} <= set(result)


@pytest.mark.parametrize("flags,message", [
    (["--no-compile"], "only applies to --backend pt2e"),
    (["--backend", "pt2e", "--batch-size", "0"], "--batch-size"),
    (["--calib-batches", "0"], "--calib-batches"),
    (["--threads", "0"], "--threads"),
])
def test_cli_bad_input(tmp_path, capsys, flags, message) -> None:
    from quantizable.cli.main import main

    create_model("vit-tiny").save_pretrained(tmp_path / "run" / "model")
    assert main(["export", str(tmp_path / "run"), "--int8", *flags, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model(tmp_path, capsys) -> None:
    from quantizable.cli.main import main

    assert main(["export", str(tmp_path / "nowhere"), "--int8", "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- PT2E (torchao X86InductorQuantizer) -------------------------------------------------------------------------

PT2E_CASES = [*CASES, ("opt-tiny", "vanilla"), ("bert-tiny", "vanilla")]


@pytest.mark.slow
@pytest.mark.parametrize("preset,method", PT2E_CASES)
def test_pt2e_int8_logits_close_to_fp32(tmp_path, preset: str, method: str) -> None:
    from quantizable.export.pt2e import export_program, logits_function, quantize_program

    model = _saved_model(tmp_path, preset, method)
    program = export_program(model, tiny_batch(preset, batch=4))
    # calibrating OPT runs its integer position-id product through the quantizer: it must get no observer
    int8 = quantize_program(program, [tiny_batch(preset, batch=4, seed=seed) for seed in range(1, 4)])
    batch = tiny_batch(preset, batch=3, seed=7)  # another batch size: the batch axis is dynamic
    reference = _logits(model, batch)
    fp32_logits, int8_logits = logits_function(program.module())(batch), logits_function(int8)(batch)
    assert fp32_logits.shape == int8_logits.shape == reference.shape
    torch.testing.assert_close(fp32_logits, reference, atol=1e-5, rtol=1e-5)
    relative = (int8_logits - reference).norm() / reference.norm()
    assert 0 < relative < 0.15, relative
    # every Linear (head included) has INT8 weights with one scale per tensor, as in the simulator
    weights = [node for node in int8.graph.nodes if node.target == torch.ops.quantized_decomposed.dequantize_per_channel.default]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(weights) >= len(linears)
    for node in weights:
        qweight, scale = (getattr(int8, arg.target) for arg in node.args[:2])
        assert qweight.dtype == torch.int8 and torch.all(scale == scale[0]) and 0 < float(scale[0]) < 1
    used = {node.target for node in int8.graph.nodes if node.op == "get_attr"}
    assert all(name in used for name, _ in int8.named_parameters())  # no FP32 weight kept beside its INT8 copy


def test_pt2e_export_int8_reports_quality(tmp_path) -> None:
    model = create_model("opt-tiny", spec_for_method("gated_attention")).eval()
    evaluation = _text_batches(2, seed=100)
    result = export_int8(model, _text_batches(3, seed=0), lambda: evaluation, tmp_path, backend="pt2e", repeats=2,
                         compile=False)
    assert result["backend"] == "pt2e" and result["metric"] == "perplexity" and not result["compiled"]
    assert abs(result["int8"]["metric"] / result["fp32"]["metric"] - 1) < 0.05
    assert result["simulated_w8a8"]["torch_fp"] == pytest.approx(result["fp32"]["metric"], rel=1e-5)
    # the saved INT8 program loads back and computes the same logits
    loaded = torch.export.load(tmp_path / result["files"]["int8"]).module()
    batch = {k: v for k, v in evaluation[0].items() if k != "labels"}
    from quantizable.export.pt2e import logits_function

    assert logits_function(loaded)(batch).shape == (4, 16, 512)


@pytest.mark.slow
def test_pt2e_compiled_runs_int8_kernels(tmp_path) -> None:
    """torch.compile (freezing) lowers the quantized Linears to oneDNN INT8 kernels and keeps the numbers."""
    from quantizable.export.pt2e import Compiled, export_program, logits_function, quantize_program

    model = create_model("opt-tiny", spec_for_method("clipped_softmax")).eval()
    program = export_program(model, tiny_batch("opt-tiny", batch=4))
    int8 = quantize_program(program, [tiny_batch("opt-tiny", batch=4, seed=seed) for seed in range(1, 3)])
    batch = tiny_batch("opt-tiny", batch=4, seed=7)
    compiled = logits_function(Compiled(int8))
    with torch.profiler.profile() as profile:
        logits = compiled(batch)
    kernels = {event.name for event in profile.events()}
    assert any("qlinear" in name for name in kernels), sorted(kernels)[:20]
    reference = logits_function(int8)(batch)
    assert ((logits - reference).norm() / reference.norm()) < 0.02


@pytest.mark.usefixtures("default_data")  # conftest: prepared once, never a silent skip
def test_cli_pt2e_writes_int8_json(tmp_path) -> None:
    from quantizable.cli.main import main

    run = _vit_run(tmp_path, "clipped_softmax")
    out = tmp_path / "out"
    argv = ["export", str(run), "--int8", "--backend", "pt2e", "--no-compile", "--calib-batches", "2",
            "--eval-batches", "2", "--batch-size", "4", "--no-simulate", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "int8.json").read_text())
    assert result["backend"] == "pt2e" and result["metric"] == "accuracy" and result["eval_count"] == 8
    assert (out / "model.int8.pt2").exists() and (out / "model.fp32.pt2").exists()


def test_export_keeps_equal_parameters_constant(tmp_path) -> None:
    """A fresh OPT has all-zero biases, which the TorchScript exporter deduplicates into ``Identity`` nodes; the
    export turns them back into initializers, so every Gemm bias is a constant that ORT quantizes to INT32 inside
    the INT8 kernel (ORT's "bias is not constant" warning), and the graph still computes the model."""
    model = create_model("opt-tiny", spec_for_method("vanilla")).eval()
    assert all(float(module.bias.abs().max()) == 0 for name, module in model.named_modules() if name.endswith("fc2"))
    fp32 = export_onnx(model, tiny_batch("opt-tiny"), tmp_path / "fp32.onnx")
    graph = onnx.load(str(fp32)).graph
    constants = {init.name for init in graph.initializer}
    assert not [node.name for node in graph.node if node.op_type == "Identity" and node.input[0] in constants]
    gemms = [node for node in graph.node if node.op_type == "Gemm"]
    assert gemms and all(set(node.input[1:]) <= constants for node in gemms)
    batch = tiny_batch("opt-tiny", batch=2, length=20, seed=3)
    torch.testing.assert_close(_ort_logits(fp32, batch), _logits(model, batch), atol=1e-4, rtol=1e-4)
    int8 = onnx.load(str(quantize_onnx(fp32, tmp_path / "int8.onnx", [tiny_batch("opt-tiny", seed=1)]))).graph
    producers = {output: node for node in int8.node for output in node.output}
    int32 = {init.name for init in int8.initializer if init.data_type == onnx.TensorProto.INT32}
    biases = [producers[node.input[2]] for node in int8.node if node.op_type == "Gemm"]
    assert len(biases) == len(gemms)
    assert all(node.op_type == "DequantizeLinear" and node.input[0] in int32 for node in biases)


def test_latency_rounds_rotate_and_time_every_function() -> None:
    """Timing is interleaved and each round starts one function later, so none always runs first; the medians are
    per function and in milliseconds."""
    import time

    from quantizable.export import median_latencies_ms

    calls: list[str] = []

    def sleeper(name: str, seconds: float):
        def logits(inputs):
            calls.append(name)
            time.sleep(seconds)
            return inputs["input_ids"]

        return logits

    functions = {"a": sleeper("a", 0.002), "b": sleeper("b", 0.0), "c": sleeper("c", 0.0)}
    latency = median_latencies_ms(functions, {"input_ids": torch.zeros(1, 2), "labels": torch.zeros(1, 2)},
                                  repeats=3, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert set(latency) == {"a", "b", "c"} and latency["a"] >= 2.0 > latency["b"]


def test_gemm_limit_calls_time_every_kernel_kind(tmp_path) -> None:
    """bench_int8's same-run GEMM limit: one FP32 GEMM and one ``MatMulInteger`` per 8-bit kernel kind asked for
    (u8 x u8, u8 x s8, s8 x s8), each giving the product's shape; an unknown kind is refused."""
    from quantizable.benchmarking import GEMM_KINDS, ort_gemm_limit_calls

    calls = ort_gemm_limit_calls(tmp_path, 8, 16, 24, threads=1, kinds=GEMM_KINDS, prefix="head")
    assert set(calls) == {"head_fp32", "head_u8u8", "head_u8s8", "head_s8s8"}
    assert all(call()[0].shape == (8, 24) for call in calls.values())
    with pytest.raises(ValueError, match="unknown GEMM kinds"):
        ort_gemm_limit_calls(tmp_path, 8, 16, 24, threads=1, kinds=("s8u8",))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["opt-tiny", "bert-tiny", "llama-tiny"])
def test_head_writes_float_logits(tmp_path, preset: str) -> None:
    """The INT8 head keeps INT8 inputs and weights but no output quantizer: ORT fuses it into one
    ``MatMulIntegerToFloat`` (BERT's separate bias add folded into it) and the logits are closer to FP32 than with
    256-level logits."""
    import onnxruntime as ort

    model = _saved_model(tmp_path, preset, "vanilla")
    fp32 = export_onnx(model, tiny_batch(preset), tmp_path / "fp32.onnx")
    calibration = [tiny_batch(preset, batch=4, seed=seed) for seed in range(1, 4)]
    paths = {flag: quantize_onnx(fp32, tmp_path / f"int8-{flag}.onnx", calibration, float_logits=flag)
             for flag in (True, False)}
    graphs = {flag: onnx.load(str(path)).graph for flag, path in paths.items()}
    producers = {flag: {out: node.op_type for node in graph.node for out in node.output}
                 for flag, graph in graphs.items()}
    assert producers[False]["logits"] == "DequantizeLinear" and producers[True]["logits"] in ("MatMul", "MatMulIntegerToFloat")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(paths[True]), options, providers=["CPUExecutionProvider"])
    assert "MatMulIntegerToFloat" in {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    batch = tiny_batch(preset, batch=3, length=24, seed=7)
    reference = _logits(model, batch)
    error = {flag: float((_ort_logits(path, batch) - reference).norm() / reference.norm())
             for flag, path in paths.items()}
    assert 0 < error[True] < error[False], error


def _one_matmul_graph(path, weight) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "one_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", weight.shape[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_int8_gemm_is_exact_on_this_cpu(tmp_path) -> None:
    """The INT8 GEMM of ``quantize_onnx``'s default weight type computes the integer product exactly, checked against
    numpy's int64 matmul of the graph's own quantized values. Inputs near the top of the u8 range and weights near
    +-127 make ORT's u8 x s8 kernel saturate on x86 without VNNI (its int16 pair sums overflow): there the
    default is unsigned weights, and signed ones would fail this check."""
    import numpy as np

    rng = np.random.default_rng(0)
    weight = (rng.choice([-1.0, 1.0], size=(256, 64)) * rng.uniform(0.9, 1.0, size=(256, 64))).astype(np.float32)
    _one_matmul_graph(tmp_path / "fp32.onnx", weight)
    x = torch.from_numpy(rng.uniform(0.0, 1.0, size=(32, 256)).astype(np.float32))
    x[:, ::2] = 1.0  # adjacent inputs at the top of the grid: the pairs vpmaddubsw sums in int16
    int8 = quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [{"x": x}])
    graph = onnx.load(str(int8)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    dequantize = {node.output[0]: node for node in graph.node if node.op_type == "DequantizeLinear"}
    matmul = next(node for node in graph.node if node.op_type == "MatMul")
    x_dq, w_dq = (dequantize[name] for name in matmul.input)
    x_scale, x_zero = (values[name] for name in x_dq.input[1:])
    w_int, w_scale, w_zero = (values[name] for name in w_dq.input)
    # QuantizeLinear: round half to even, saturate to uint8
    x_int = np.clip(np.rint(x.numpy() / x_scale) + x_zero, 0, 255)
    exact = (x_int.astype(np.int64) - int(x_zero)) @ (w_int.astype(np.int64) - int(w_zero))
    expected = exact * float(x_scale) * float(w_scale)
    (actual,) = session(int8).run(["logits"], {"x": x.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
