"""The fast paths equal the reference ops, in values and gradients: clipped softmax's single node (attention.fused)
and the fused linear gate (attention.gates), both with the C row kernels (attention.cpu_kernel; to float rounding)
and, for clipped softmax, with its ATen ops (forward bit for bit)."""

import os

import pytest
import torch
from torch import nn

from quantizable.attention import AttentionGate, AttentionSpec
from quantizable.attention import cpu_kernel, fused
from quantizable.attention.fused import clipped_softmax_attention
from quantizable.attention.interface import fused_attention, quantizable_attention_forward
from quantizable.attention.softmax import clipped_softmax
from quantizable.models import attention_modules, create_model

from .conftest import tiny_batch

TOL = dict(rtol=1e-5, atol=1e-5)
KERNEL_TOL = dict(rtol=1e-4, atol=1e-4)  # the kernel sums in another order: gradients of size ~10 differ by ~1e-5
B, H, T, D = 2, 4, 24, 8


class _Attention(nn.Module):
    """The attributes the attention function reads from a Hugging Face attention module."""

    def __init__(self, spec: AttentionSpec, kv_groups: int = 1) -> None:
        super().__init__()
        self.attention_spec = spec
        self.num_key_value_groups = kv_groups


def _qkv(kv_heads: int = H) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(B, H, T, D), (B, kv_heads, T, D), (B, kv_heads, T, D)]
    # large scores, so that many probabilities fall below the clipping threshold and some reach 1
    return [(torch.randn(s, generator=g) * 3).requires_grad_() for s in shapes]


def _masks() -> dict[str, dict]:
    padding = torch.ones(B, 1, T, T, dtype=torch.bool)
    padding[1, :, :, T - 5:] = False
    padding[1, :, 3, :] = False  # a fully masked row: uniform probabilities, no gradient
    additive = torch.zeros(B, 1, T, T).masked_fill(~padding, torch.finfo(torch.float32).min)
    keys = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keys[1, ..., T - 7:] = False  # padded keys of the second sequence: the kernel's (B, T_k) bias
    return {
        "none": dict(attention_mask=None),
        "causal": dict(attention_mask=None, is_causal=True),
        "bool_padding": dict(attention_mask=padding),
        "additive_padding": dict(attention_mask=additive),
        "bool_keys": dict(attention_mask=keys),
        "additive_keys": dict(attention_mask=torch.zeros(B, 1, 1, T).masked_fill(~keys, float("-inf"))),
        "bool_causal": dict(attention_mask=torch.ones(T, T, dtype=torch.bool).tril()),
        # what transformers materialises for a padded batch: kernel masks recognised in it
        "materialised_keys": dict(attention_mask=keys.expand(B, 1, T, T).clone()),
        "materialised_keys_causal": dict(attention_mask=keys & torch.ones(T, T, dtype=torch.bool).tril()),
    }


@pytest.fixture(autouse=True, params=["kernel", "kernel_threads", "aten"])
def backend(request, monkeypatch):
    """Every test runs with the C row kernel (one thread, and rows split over two threads) and with ATen ops."""
    if request.param == "aten":
        with cpu_kernel.use_cpu_kernel(False):
            yield request.param
        return
    if request.param == "kernel_threads":
        monkeypatch.setattr(cpu_kernel, "PARALLEL_MIN_ELEMENTS", 0)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    yield request.param


def _assert_same(got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    """Bit for bit on the ATen ops (the same ops in the same order); to float rounding in the kernel."""
    if backend == "aten":
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, **TOL), f"max diff {(got - want).abs().max()}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    tol = TOL if backend == "aten" else KERNEL_TOL
    assert torch.allclose(got, want, **tol), f"max diff {(got - want).abs().max()}"


@pytest.mark.skipif(os.environ.get("QUANTIZABLE_NO_KERNEL", "") not in ("", "0"), reason="kernel switched off")
def test_the_kernel_builds_here():
    assert cpu_kernel.load_kernel() is not None


@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0, 300.0])
def test_kernel_softmax_is_as_accurate_as_torch(spread, backend):
    """The kernel's own exp: probabilities within float32 rounding of a float64 softmax, over every logit range
    (rows of 131 keys: vector body and scalar tail)."""
    if backend == "aten" or cpu_kernel.load_kernel() is None:
        pytest.skip("kernel only")
    logits = torch.randn(2, 3, 40, 131, generator=torch.Generator().manual_seed(3)) * spread
    want = torch.softmax(logits.double(), dim=-1)
    probs = cpu_kernel.clipped_softmax_rows(logits.clone(), 1.0, 0.0, 1.0)
    visible = want > 1e-30  # below that the kernel writes exact zeros (see PROB_FLOOR)
    assert torch.all(probs[~visible] == 0)
    def relative_error(got: torch.Tensor) -> float:
        return ((got.double() - want).abs() / want)[visible].max().item()

    error, torch_error = relative_error(probs), relative_error(torch.softmax(logits, dim=-1))
    assert error <= 1.5 * torch_error + 5e-7, f"max relative error {error} (torch.softmax: {torch_error})"


def _run(module: nn.Module, fused: bool, kv_heads: int = H, **kwargs) -> tuple[torch.Tensor, tuple]:
    q, k, v = _qkv(kv_heads)
    with fused_attention(fused):
        out, _ = quantizable_attention_forward(module, q, k, v, dropout=0.0, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return out, torch.autograd.grad(out, (q, k, v), upstream)


@pytest.fixture(params=["one_block", "row_blocks"])
def blocks(request, monkeypatch):
    """Run once with all query rows in one block and once in blocks of 5 rows (the last one shorter)."""
    if request.param == "row_blocks":
        monkeypatch.setattr(fused, "BLOCK_ELEMENTS", B * H * T * 5)
    return request.param


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize("gamma, zeta", [(-0.03, 1.0), (-0.1, 1.05), (0.0, 1.0)])
def test_fast_path_matches_reference(mask, gamma, zeta, blocks, backend):
    module = _Attention(AttentionSpec(kind="clipped_softmax", gamma=gamma, zeta=zeta)).train()
    kwargs = _masks()[mask]
    ref_out, ref_grads = _run(module, False, **kwargs)
    out, grads = _run(module, True, **kwargs)
    _assert_same(out, ref_out, backend)
    for name, got, want in zip("qkv", grads, ref_grads):
        _assert_close(got, want, backend)


def test_fast_path_matches_reference_with_grouped_kv_heads(blocks, backend):
    module = _Attention(AttentionSpec(kind="clipped_softmax", gamma=-0.05), kv_groups=2)
    ref_out, ref_grads = _run(module, False, kv_heads=H // 2, attention_mask=None, is_causal=True)
    out, grads = _run(module, True, kv_heads=H // 2, attention_mask=None, is_causal=True)
    _assert_same(out, ref_out, backend)
    for got, want in zip(grads, ref_grads):
        _assert_close(got, want, backend)


def test_materialised_padding_masks_are_recognised():
    keys = _masks()["bool_keys"]["attention_mask"]
    for name, causal in (("materialised_keys", False), ("materialised_keys_causal", True)):
        found, found_causal = fused._kernel_masks(_masks()[name]["attention_mask"], T, T)
        assert torch.equal(found, keys) and found_causal == causal
    assert fused._kernel_masks(_masks()["bool_padding"]["attention_mask"], T, T) == (None, False)  # a dead row


def test_clipping_is_active_in_these_tests():
    """Guard: the inputs above must exercise both clamp ends, or the gradient tests would not test the clamp."""
    q, k, _ = _qkv()
    probs = clipped_softmax(q @ k.transpose(2, 3) * D**-0.5, -0.1, 1.05)
    assert (probs == 0).float().mean() > 0.3 and (probs == 1).any() and ((probs > 0) & (probs < 1)).any()


def test_dropout_matches_reference_with_the_same_mask(blocks, backend):
    q, k, v = _qkv()
    p, gamma, scaling = 0.3, -0.03, D**-0.5
    torch.manual_seed(5)
    out = clipped_softmax_attention(q, k, v, None, scaling, gamma, 1.0, dropout=p)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(5)  # the same draws as dropout inside the fast path: same shape, same generator state
    keep = nn.functional.dropout(torch.ones(B, H, T, T), p=p)
    ref = (clipped_softmax(q @ k.transpose(2, 3) * scaling, gamma) * keep) @ v
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.allclose(out, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        _assert_close(got, want, backend)


def test_probability_taps_take_the_reference_path(backend):
    module = _Attention(AttentionSpec(kind="clipped_softmax", gamma=-0.03))
    seen = []
    module.attention_taps = {"probs": lambda p: seen.append(p) or p}
    q, k, v = _qkv()
    out, probs = quantizable_attention_forward(module, q, k, v, None, dropout=0.0)
    assert len(seen) == 1 and probs is seen[0]
    del module.attention_taps
    fast_out, fast_probs = quantizable_attention_forward(module, q, k, v, None, dropout=0.0)
    assert fast_probs is None
    _assert_same(fast_out, out, backend)


NO_ATTENTION_DROPOUT = {
    "bert-tiny": dict(attention_probs_dropout_prob=0.0),
    "opt-tiny": dict(attention_dropout=0.0),
    "vit-tiny": dict(attention_probs_dropout_prob=0.0),
    "llama-tiny": dict(attention_dropout=0.0),
}


@pytest.mark.parametrize("dim", [16, 12])  # a head size the kernel specialises, and one it does not
def test_fused_linear_gate_matches_the_aten_gate(dim, backend):
    heads = 5
    spec = AttentionSpec(kind="gated_attention", gate_type="linear")
    gate = AttentionGate(spec, heads * dim, heads, dim, init_std=1.0)  # wide logits: some gates saturate
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, heads * dim, generator=g).requires_grad_()
    # the attention output as the clipped path hands it over: a transposed (non-contiguous) view
    output = torch.randn(3, heads, 7, dim, generator=g).transpose(1, 2).requires_grad_()
    upstream = torch.randn(3, 7, heads, dim, generator=g)
    inputs = (output, x, gate.weight, gate.bias)
    with fused_attention(False):
        want = gate.gated(output, x)
    got = gate.gated(output, x)
    fused_node = "quantizable_linear_gate" in type(got.grad_fn).__name__  # the custom op's autograd node
    assert fused_node == (backend != "aten" and cpu_kernel.load_kernel() is not None)
    _assert_same(got, want, backend)
    for got_grad, want_grad in zip(torch.autograd.grad(got, inputs, upstream),
                                   torch.autograd.grad(want, inputs, upstream)):
        _assert_close(got_grad, want_grad, backend)


@pytest.mark.parametrize("preset", list(NO_ATTENTION_DROPOUT))
@pytest.mark.parametrize("spec", [AttentionSpec(kind="clipped_softmax", gamma=-0.05),
                                  AttentionSpec(kind="gated_attention", gate_type="linear")],
                         ids=["clipped_softmax", "linear_gate"])
def test_training_step_gradients_match_in_every_family(preset, spec, backend):
    model = create_model(preset, spec, **NO_ATTENTION_DROPOUT[preset]).train()
    batch = tiny_batch(preset)
    if "attention_mask" in batch:
        batch["attention_mask"][1, -5:] = 0
    labels = {"labels": torch.zeros(2, dtype=torch.long) if preset.startswith("vit") else batch["input_ids"]}

    def loss_and_grads(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # identical hidden-dropout masks in both runs
        with fused_attention(fused):
            loss = model(**batch, **labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert attention_modules(model)[0].attention_spec.kind == spec.kind
    ref_loss, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    _assert_same(loss, ref_loss, backend)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_close(grads[name], ref_grads[name], backend)
