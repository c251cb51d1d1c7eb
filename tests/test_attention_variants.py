"""Numerics of clipped softmax, softmax+1 and the attention gates (paper sections 4.1, 4.2)."""

import math

import pytest
import torch

from quantizable.attention import AttentionGate, AttentionSpec, clipped_softmax, gamma_from_alpha, softmax_plus_one


def test_clipped_softmax_identity_when_not_stretched():
    x = torch.randn(4, 8, 16)
    assert torch.allclose(clipped_softmax(x, gamma=0.0, zeta=1.0), torch.softmax(x, -1), atol=1e-6)


def test_clipped_softmax_exact_zeros_and_zero_gradient():
    gamma, zeta = -0.025, 1.0
    x = (torch.randn(64, 32) * 3).requires_grad_()
    p = torch.softmax(x, -1)
    y = clipped_softmax(x, gamma, zeta)
    threshold = -gamma / (zeta - gamma)
    below = p < threshold
    assert below.any() and (~below).any()
    assert torch.all(y[below] == 0.0)
    assert torch.all(y[~below] > 0.0)
    (y * torch.randn_like(y)).sum().backward()
    # zero gradient flows through clipped entries: the input grad equals softmax's backward of the unclipped part
    upstream = torch.randn_like(y)
    x2 = x.detach().clone().requires_grad_()
    y2 = clipped_softmax(x2, gamma, zeta)
    (y2 * upstream).sum().backward()
    p2 = torch.softmax(x2.detach(), -1)
    masked = upstream * (zeta - gamma) * (~below)
    expected = p2 * (masked - (masked * p2).sum(-1, keepdim=True))
    assert torch.allclose(x2.grad, expected, atol=1e-6)


def test_clipped_softmax_hand_computed():
    # softmax([0, ln 3]) = [0.25, 0.75]; gamma=-0.1, zeta=1.1: 1.2*p - 0.1 -> [0.2, 0.8]
    x = torch.tensor([[0.0, math.log(3.0)]])
    assert torch.allclose(clipped_softmax(x, -0.1, 1.1), torch.tensor([[0.2, 0.8]]), atol=1e-6)
    # softmax([0, ln 99]) = [0.01, 0.99]; gamma=-0.025: 1.025*p - 0.025 -> [0 (clipped), 0.98975]
    x = torch.tensor([[0.0, math.log(99.0)]])
    assert torch.allclose(clipped_softmax(x, -0.025, 1.0), torch.tensor([[0.0, 0.98975]]), atol=1e-6)


def test_gamma_from_alpha_uses_configured_length():
    assert gamma_from_alpha(12, 512) == pytest.approx(-0.0234375)
    spec = AttentionSpec(kind="clipped_softmax", alpha=4, seq_len=128)
    assert spec.resolved_gamma() == pytest.approx(-4 / 128)


def test_softmax_plus_one_matches_definition():
    x = torch.randn(3, 7) * 5
    e = torch.exp(x)
    assert torch.allclose(softmax_plus_one(x), e / (1 + e.sum(-1, keepdim=True)), atol=1e-6)
    assert torch.all(softmax_plus_one(torch.full((1, 4), -50.0)).sum() < 1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="clipped_softmax", gamma=0.1), "gamma"),
        (dict(kind="clipped_softmax", gamma=-0.1, zeta=0.9), "zeta"),
        (dict(kind="gated_attention", pi_init=0.0), "pi_init"),
        (dict(kind="gated_attention", pi_init=1.5), "pi_init"),
        (dict(kind="gated_attention", gate_type="conv"), "gate_type"),
        (dict(kind="softmax2"), "kind"),
        (dict(kind="gated_attention", gate_type="mlp", n_hid=0), "n_hid"),
        (dict(kind="clipped_softmax"), "gamma"),
    ],
)
def test_bad_spec_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AttentionSpec(**kwargs)


def test_spec_round_trips_through_dict():
    spec = AttentionSpec(kind="gated_attention", gate_type="mlp", pi_init=0.3, n_hid=8)
    assert AttentionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown attention spec field"):
        AttentionSpec.from_dict({"kind": "vanilla", "temperature": 2})


@pytest.mark.parametrize("gate_type, per_layer", [
    ("linear", lambda h, d, n: h * (d + 1)),
    ("mlp", lambda h, d, n: h * (d * n + n + n + 1)),
    ("all_heads_linear", lambda h, d, n: h * (h * d + 1)),
    ("elementwise", lambda h, d, n: h * d * (h * d + 1)),
])
def test_gate_parameter_counts(gate_type, per_layer):
    heads, head_dim, n_hid = 4, 16, 4
    gate = AttentionGate(AttentionSpec(kind="gated_attention", gate_type=gate_type, n_hid=n_hid), 64, heads, head_dim)
    assert sum(p.numel() for p in gate.parameters()) == per_layer(heads, head_dim, n_hid)


@pytest.mark.parametrize("gate_type", ["linear", "mlp", "all_heads_linear", "elementwise"])
@pytest.mark.parametrize("pi_init", [0.25, 0.5, 0.9])
def test_initial_gate_mean_is_pi_init(gate_type, pi_init):
    spec = AttentionSpec(kind="gated_attention", gate_type=gate_type, pi_init=pi_init)
    gate = AttentionGate(spec, 64, 4, 16, init_std=0.02)
    probs = gate(torch.randn(8, 32, 64))
    assert probs.mean().item() == pytest.approx(pi_init, abs=0.02)


def test_per_head_gate_shape_and_slicing():
    gate = AttentionGate(AttentionSpec(kind="gated_attention"), 64, 4, 16)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[2, :] = 1.0  # head 2 looks only at its own slice 32:48
        gate.bias.zero_()
    x = torch.zeros(1, 3, 64)
    x[..., 32:48] = 10.0
    probs = gate(x)
    assert probs.shape == (1, 3, 4, 1)
    assert torch.all(probs[:, :, 2] > 0.99) and torch.allclose(probs[:, :, [0, 1, 3]], torch.tensor(0.5))
