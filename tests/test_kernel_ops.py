"""The C row kernels as part of the process: they leave the floating-point environment alone (no flush-to-zero),
and their build cache survives concurrent first use and missing or failing compilers."""

import os
import subprocess
import sys
import textwrap

import pytest

from quantizable.attention import cpu_kernel

NO_KERNEL = os.environ.get("QUANTIZABLE_NO_KERNEL", "") not in ("", "0")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: no other test's kernel load or FPU setting can hide what it checks."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


DENORMALS_SURVIVE = """
    import threading
    import torch
    from quantizable.attention import AttentionGate, AttentionSpec, cpu_kernel
    from quantizable.attention.fused import clipped_softmax_attention

    def denormals_survive() -> bool:
        return (1e-308 / 10 != 0.0
                and (torch.tensor([1e-40]) * 1.0).item() != 0.0
                and (torch.tensor([5e-324], dtype=torch.float64) * 1.0).item() != 0.0
                and (torch.tensor([1e-30]) * 1e-10).item() != 0.0)  # an op whose result is subnormal

    assert denormals_survive(), "denormals already flushed before the kernel ran"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):  # float32: the C kernels; float64: their ATen fallback
        q, k, v = (torch.randn(2, 4, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
        mask[1, ..., -3:] = False
        out = clipped_softmax_attention(q, k, v, mask, 8**-0.5, -0.03, 1.0)
        out.sum().backward()
        gate = AttentionGate(AttentionSpec(kind="gated_attention", gate_type="linear"), 32, 4, 8).to(dtype)
        x = torch.randn(2, 16, 32, dtype=dtype, requires_grad=True)
        gated = gate.gated(torch.randn(2, 16, 4, 8, dtype=dtype, requires_grad=True), x)
        gated.sum().backward()
        if dtype == torch.float32 and cpu_kernel.load_kernel() is not None:
            assert "quantizable_linear_gate" in type(gated.grad_fn).__name__
    seen = []
    thread = threading.Thread(target=lambda: seen.append(denormals_survive()))  # a thread started afterwards
    thread.start()
    thread.join()
    assert denormals_survive() and seen == [True], "the kernel switched on flush-to-zero / denormals-are-zero"
    print("kernel" if cpu_kernel.load_kernel() is not None else "aten")
"""


def test_fast_paths_leave_denormals_intact():
    """-ffast-math on a shared library made GCC < 13 link crtfastmath.o, which switched on FTZ/DAZ for the whole
    process at load: afterwards ``1e-308 / 10 == 0.0`` in plain Python."""
    result = _python(DENORMALS_SURVIVE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == ("aten" if NO_KERNEL else "kernel")


@pytest.mark.skipif(NO_KERNEL, reason="kernel switched off")
def test_the_library_does_not_carry_fast_math_startup_code():
    """The cause, checked on the binary: crtfastmath.o's constructor is named ``set_fast_math``."""
    library = cpu_kernel.load_kernel()
    assert library is not None
    assert b"set_fast_math" not in open(library._name, "rb").read()
    assert not any(flag in cpu_kernel.FLAGS for flag in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations"))


BUILD_AND_RUN = """
    import threading
    import torch
    from quantizable.attention import cpu_kernel

    def use() -> None:
        assert cpu_kernel.load_kernel() is not None
        scores = torch.randn(2, 2, 8, 8)
        cpu_kernel.clipped_softmax_rows(scores, 0.5, -0.03, 1.0)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    use()
"""


@pytest.mark.slow
@pytest.mark.skipif(NO_KERNEL, reason="kernel switched off")
def test_concurrent_first_use_builds_one_library(tmp_path):
    """Three processes of three threads each find an empty cache at once: one build, no partial file left over,
    every caller loads a complete library."""
    env = {**os.environ, "QUANTIZABLE_KERNELS": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILD_AND_RUN)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    assert [p.suffix for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [".so"]


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["/bin/false", "/nonexistent/cc"])
def test_a_failing_or_missing_compiler_falls_back_with_one_logged_line(compiler, tmp_path):
    code = DENORMALS_SURVIVE  # forward and backward through both fast paths, which must fall back to ATen
    result = _python(code, CC=compiler, QUANTIZABLE_KERNELS=str(tmp_path), QUANTIZABLE_NO_KERNEL="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "aten"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "using ATen ops" in lines[0] and compiler in lines[0], result.stderr
    assert not any(tmp_path.glob("*.so")), "no library, partial or whole, is left behind"


def test_cpu_identity_without_proc_cpuinfo_or_os_uname(monkeypatch):
    """Windows and macOS: no /proc/cpuinfo and (Windows) no ``os.uname``."""
    monkeypatch.setattr(cpu_kernel, "CPUINFO", cpu_kernel.Path("/nonexistent/cpuinfo"))
    monkeypatch.delattr(os, "uname", raising=False)
    assert cpu_kernel._cpu_identity().split()[0] == cpu_kernel.platform.machine()


def test_argtypes_are_the_c_signatures():
    """The ctypes argtypes are read from the C source (a parameter type the reader does not know fails here)."""
    found = cpu_kernel.signatures(cpu_kernel.SOURCE.read_text())
    assert set(found) == {"clipped_softmax_forward", "clipped_softmax_backward", "linear_gate_forward",
                          "linear_gate_backward"}
    library = cpu_kernel.load_kernel()
    if library is not None:
        for name, argtypes in found.items():
            assert getattr(library, name).argtypes == argtypes


@pytest.mark.skipif(NO_KERNEL, reason="kernel switched off")
def test_max_heads_has_one_definition_given_by_python(tmp_path):
    """The C source cannot be built without Python's -DMAX_HEADS (no second definition to drift), and the gate
    kernel is used up to exactly that many heads."""
    compiler = os.environ.get("CC") or cpu_kernel.shutil.which("cc") or cpu_kernel.shutil.which("gcc")
    command = [part for part in cpu_kernel.compile_command(compiler, tmp_path / "lib.so")
               if not part.startswith("-DMAX_HEADS=")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "MAX_HEADS" in result.stderr
    assert cpu_kernel.DEFINES["MAX_HEADS"] == cpu_kernel.MAX_GATE_HEADS
    import torch

    from quantizable.attention import AttentionGate, AttentionSpec
    from quantizable.attention.switch import fused_attention

    spec = AttentionSpec(kind="gated_attention", gate_type="linear")
    for heads in (cpu_kernel.MAX_GATE_HEADS, cpu_kernel.MAX_GATE_HEADS + 1):
        gate = AttentionGate(spec, heads * 2, heads, 2, init_std=1.0)
        output, x = torch.randn(1, 3, heads, 2), torch.randn(1, 3, heads * 2)
        with fused_attention(False):
            want = gate.gated(output, x)
        assert torch.allclose(gate.gated(output, x), want, atol=1e-6)


@pytest.mark.skipif(NO_KERNEL, reason="kernel switched off")
def test_kernel_rows_propagate_nan_and_take_infinite_scores_as_torch():
    """Why the kernel is not built with -ffinite-math-only: with it a NaN score became probability 0. A row with
    NaN or +inf is NaN throughout, as in torch.softmax; a -inf key gets 0; a row of only -inf (fully masked by an
    additive mask) is uniform, as the reference's finfo.min mask makes it."""
    import torch

    scores = torch.randn(1, 1, 5, 37, generator=torch.Generator().manual_seed(0))
    scores[0, 0, 0, 3] = float("nan")
    scores[0, 0, 1, 36] = float("nan")  # in the rows' scalar tail
    scores[0, 0, 2, 5] = float("inf")
    scores[0, 0, 3, 7] = float("-inf")
    scores[0, 0, 4] = float("-inf")
    probs = cpu_kernel.clipped_softmax_rows(scores.clone(), 1.0, 0.0, 1.0)
    want = torch.softmax(scores, dim=-1)
    assert torch.allclose(probs[0, 0, :4], want[0, 0, :4], atol=1e-6, equal_nan=True)
    assert probs[0, 0, :3].isnan().all() and probs[0, 0, 3, 7] == 0
    assert torch.allclose(probs[0, 0, 4], torch.full((37,), 1 / 37))
    grad = torch.randn_like(scores)
    cpu_kernel.clipped_softmax_rows_backward(grad, probs, torch.empty_like(scores), 0.0, 1.0)
    assert grad[0, 0, :3].isnan().all() and not grad[0, 0, 3:].isnan().any()


# --- the fast paths as custom ops: visible to torch.compile and torch.export ---------------------------------------

SPECS = {"clipped_softmax": dict(kind="clipped_softmax", gamma=-0.05),
         "linear_gate": dict(kind="gated_attention", gate_type="linear")}


def _tiny_model(spec_name: str):
    import torch

    from quantizable.attention import AttentionSpec
    from quantizable.models import create_model

    from .conftest import tiny_batch

    torch.manual_seed(0)
    model = create_model("bert-tiny", AttentionSpec(**SPECS[spec_name]), attention_probs_dropout_prob=0.0,
                         hidden_dropout_prob=0.0)
    batch = tiny_batch("bert-tiny")
    batch["attention_mask"][1, -5:] = 0  # padding: the kernel's key-bias mask
    return model, {**batch, "labels": batch["input_ids"]}


def _quantizable_ops(graphs) -> set[str]:
    return {str(node.target) for graph in graphs for node in graph.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("quantizable.")}


@pytest.mark.parametrize("ours", [True, False], ids=["our_ops", "default"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_dynamo_sees_our_attention_as_one_op_without_graph_breaks(spec_name, ours):
    """With ``compiled_fast_paths(True)`` the graph holds our op; by default the reference ops (faster under
    Inductor, docs/performance.md); no graph break either way."""
    import torch

    from quantizable.attention.switch import compiled_fast_paths

    model, batch = _tiny_model(spec_name)
    with compiled_fast_paths(ours):
        explanation = torch._dynamo.explain(model.train())(**batch)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    want = {"clipped_softmax": "quantizable.clipped_softmax_attention.default",
            "linear_gate": "quantizable.linear_gate.default"}[spec_name]
    traced = ours and (cpu_kernel.kernel_built() or spec_name == "clipped_softmax")
    assert _quantizable_ops(explanation.graphs) == ({want} if traced else set())


# Inductor for clipped softmax (about a minute on 2 cores, most of it compiling the generated C++ once); AOT
# autograd alone for the gate, which checks what our registrations decide (fake outputs, the backward graph)
@pytest.mark.parametrize("spec_name, backend", [("clipped_softmax", "inductor"), ("linear_gate", "aot_eager")])
def test_compiled_model_equals_eager_in_values_and_gradients(spec_name, backend):
    """torch.compile of the whole model around our ops: the same loss and parameter gradients as eager."""
    import torch

    from quantizable.attention.switch import compiled_fast_paths

    model, batch = _tiny_model(spec_name)
    model.train()

    def loss_and_grads(run) -> tuple:
        model.zero_grad(set_to_none=True)
        loss = run(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_loss, want = loss_and_grads(model)
    torch._dynamo.reset()
    with compiled_fast_paths(True):
        got_loss, got = loss_and_grads(torch.compile(model, backend=backend, fullgraph=True))
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_torch_export_traces_the_fast_path(spec_name):
    """With ``compiled_fast_paths(True)`` torch.export keeps the fast path as our ops (the INT8 exporters trace the
    reference ops: their quantizers must see the matmuls and products inside attention)."""
    import torch

    model, batch = _tiny_model(spec_name)
    model.eval()
    inputs = (batch["input_ids"], batch["attention_mask"])

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    from quantizable.attention.switch import compiled_fast_paths

    with torch.no_grad(), compiled_fast_paths(True):
        program = torch.export.export(Logits(), inputs)
        want = model(input_ids=inputs[0], attention_mask=inputs[1]).logits
        got = program.module()(*inputs)
    ops = _quantizable_ops([program.graph_module])
    if cpu_kernel.kernel_built() or spec_name == "clipped_softmax":
        assert ops, "the fast path was not traced"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def _op_samples() -> list[tuple]:
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    keys = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keys[1, ..., -2:] = False
    output = torch.randn(2, 6, 3, 4, generator=g, requires_grad=True)
    x = torch.randn(2, 6, 12, generator=g, requires_grad=True)
    weight = torch.randn(3, 4, generator=g, requires_grad=True)
    bias = torch.randn(3, generator=g, requires_grad=True)
    return [
        (torch.ops.quantizable.clipped_softmax_attention, (q, k, v, None, 0.5, -0.03, 1.0, 0.0, False)),
        (torch.ops.quantizable.clipped_softmax_attention, (q, k, v, keys, 0.5, -0.1, 1.05, 0.0, False)),
        (torch.ops.quantizable.clipped_softmax_attention, (q, k, v, None, 0.5, -0.03, 1.0, 0.0, True)),
        (torch.ops.quantizable.linear_gate, (output, x, weight, bias)),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_custom_ops_pass_opcheck(sample):
    """Schema, autograd registration, fake tensors and AOT dispatch (dynamic shapes) of each op, with the kernel
    (float32) and, for clipped softmax, its ATen branch (float64)."""
    import torch

    op, args = _op_samples()[sample]
    torch.library.opcheck(op, args)
    if op is torch.ops.quantizable.clipped_softmax_attention:
        double = tuple(a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                       else a for a in args)
        torch.library.opcheck(op, double)
