"""Mechanism metrics (sink share, value drain, residual peak, gates, clipped zeros) against hand-built inputs and
direct computations from transformers' own hidden states and the models' projection weights."""

from __future__ import annotations

import math

import pytest
import torch

from quantizable import create_model
from quantizable.analysis import analyze
from quantizable.analysis.mechanism import MechanismStats, attention_mass, sink_queries
from quantizable.attention.spec import AttentionSpec


def _rows(first: list[float], rest_on: int, length: int, valid: int) -> torch.Tensor:
    """Attention rows: query q puts first[q] on token 0 and the rest on token ``rest_on``; padding keys get 0."""
    rows = torch.zeros(length, length)
    for q in range(length):
        rows[q, 0] = first[q]
        rows[q, rest_on if q < valid else 0] += 1.0 - first[q]
    return rows


def test_sink_share_of_hand_built_pattern() -> None:
    # sequence 0: 4 valid tokens; sequence 1: 3 valid tokens, then padding (its row and column must not count)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    delimiters = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)  # token 3; padding in sequence 1
    probs = torch.stack([
        torch.stack([_rows([1.0, 0.1, 0.2, 0.3], 3, 4, 4), _rows([1.0, 0.9, 0.9, 0.9], 3, 4, 4)]),
        torch.stack([_rows([1.0, 0.6, 0.8, 1.0], 2, 4, 3), _rows([1.0, 0.0, 0.0, 1.0], 2, 4, 3)]),
    ])  # (B=2, H=2, T=4, T=4); row 0 (100% on itself) and sequence 1's padded row 3 are excluded
    assert sink_queries(valid).tolist() == [[False, True, True, True], [False, True, True, False]]
    assert attention_mass(probs, valid & (torch.arange(4) == 0), sink_queries(valid)).tolist() == \
        pytest.approx([2.0, 2.7])

    stats = MechanismStats(n_layers=2)
    uniform = torch.full((2, 2, 4, 4), 0.25)
    for layer, p in enumerate((probs, uniform)):
        stats.add_attention(layer, p, valid, delimiters, causal=False, zeroing=False)
        stats.add_value_norms(layer, torch.ones(2, 4, 1), valid)
        stats.add_hidden(layer, torch.ones(2, 4, 3), valid)
    result = stats.summary()
    # head 0: (0.1 + 0.2 + 0.3 + 0.6 + 0.8) / 5 queries; head 1: (3 * 0.9 + 0 + 0) / 5
    assert result["sink_share_per_head"] == [pytest.approx([0.4, 0.54]), pytest.approx([0.25, 0.25])]
    assert result["sink_share_per_layer"] == pytest.approx([0.47, 0.25])
    assert result["sink_share"] == pytest.approx(0.47)
    # delimiter (token 3 of sequence 0 only): head 0 (0.9 + 0.8 + 0.7) / 5, head 1 3 * 0.1 / 5
    assert result["delimiter_share_per_head"][0] == pytest.approx([0.48, 0.06])
    assert result["delimiter_share_per_head"][1] == pytest.approx([0.25 * 3 / 5, 0.25 * 3 / 5])
    assert result["sink_or_delimiter_share_per_head"][0] == pytest.approx([0.88, 0.60])
    assert result["dormant_share"] == 0.25  # one of the 4 heads has >= 50% on the first token
    assert result["dormant_share_with_delimiters"] == 0.5
    # the uniform layer puts 0.25 on sequence 1's padding key: 2 of the 5 queries miss 0.25 of their mass
    assert result["null_share_per_head"] == [pytest.approx([0.0, 0.0], abs=1e-6), pytest.approx([0.1, 0.1])]
    assert result["value_drain_per_layer"] == [1.0, 1.0] and result["residual_peak"] == 1.0
    assert result["gate_closed_share_per_head"] is None and result["clipped_zero_share_per_head"] is None


def test_sink_is_first_valid_token_with_left_padding() -> None:
    valid = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    probs = torch.tensor([[[[1, 0, 0], [0, 1, 0], [0, 0.7, 0.2]]]])  # padded row 0; query 2 puts 0.1 on no token
    stats = MechanismStats(n_layers=1)
    stats.add_attention(0, probs, valid, None, causal=True, zeroing=False)
    stats.add_value_norms(0, torch.tensor([[[9.0], [2.0], [4.0]]]), valid)
    stats.add_hidden(0, torch.tensor([[[9.0, 9.0], [3.0, -4.0], [1.0, 0.0]]]), valid)
    result = stats.summary()
    assert result["sink_share_per_head"] == [[pytest.approx(0.7)]]
    assert result["null_share_per_head"] == [[pytest.approx(0.1)]]
    assert result["delimiter_share_per_head"] is None and result["dormant_share_with_delimiters"] is None
    assert result["value_drain_per_layer"] == [0.5]
    assert result["residual_peak_per_layer"] == [5.0] and result["residual_peak_max_abs_per_layer"] == [4.0]


def _lower_median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def _sink_ratio(per_token: torch.Tensor, length: int) -> torch.Tensor:
    """Token 0 over the lower median of tokens 1..length-1, along dim 0 (a direct loop, not the library's code)."""
    others = per_token[1:length]
    return per_token[0] / torch.stack([torch.tensor(_lower_median(col.tolist())) for col in others.reshape(
        others.shape[0], -1).T]).reshape(others.shape[1:]).to(per_token.dtype)


@pytest.mark.parametrize("preset, kind", [("llama-tiny", "vanilla"), ("opt-tiny", "vanilla"),
                                          ("llama-tiny", "value_gate")])
def test_value_drain_and_residual_peak_match_direct_computation(preset: str, kind: str) -> None:
    torch.manual_seed(0)
    model = create_model(preset, AttentionSpec(kind=kind), num_hidden_layers=3).eval()
    sink_id = 7
    with torch.no_grad():  # a first token with a huge residual norm (as a trained sink grows one)
        model.get_input_embeddings().weight[sink_id] *= 200.0
        for module in model.modules():  # value gates that differ between tokens
            if hasattr(module, "attn_value_gate"):
                module.attn_value_gate.weight.normal_(0.0, 1.0)
    ids = torch.randint(10, 500, (2, 9))
    ids[:, 0] = sink_id
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    lengths = [9, 6]
    result = analyze(model, [{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    decoder = model.model.layers if preset.startswith("llama") else model.model.decoder.layers
    n_kv = model.config.num_key_value_heads if preset.startswith("llama") else model.config.num_attention_heads
    for layer in range(2):  # transformers' last hidden state is after the final norm, not the block output
        out = hidden[layer + 1].double()
        norms = [float(_sink_ratio(out[b].norm(dim=-1), n)) for b, n in enumerate(lengths)]
        max_abs = [float(_sink_ratio(out[b].abs().amax(dim=-1), n)) for b, n in enumerate(lengths)]
        assert result["residual_peak_per_layer"][layer] == pytest.approx(sum(norms) / 2, rel=1e-5)
        assert result["residual_peak_max_abs_per_layer"][layer] == pytest.approx(sum(max_abs) / 2, rel=1e-5)

        block = decoder[layer]
        norm = block.input_layernorm if preset.startswith("llama") else block.self_attn_layer_norm
        with torch.no_grad():
            values = block.self_attn.v_proj(norm(hidden[layer])).unflatten(-1, (n_kv, -1))  # (B, T, H_kv, d)
            if kind == "value_gate":  # attention mixes the gated values
                values = block.self_attn.attn_value_gate(values.transpose(1, 2)).transpose(1, 2)
            values = values.norm(dim=-1)
        drains = torch.stack([_sink_ratio(values[b].double(), n) for b, n in enumerate(lengths)])  # (B, H_kv)
        assert result["value_drain_per_head"][layer] == pytest.approx(drains.mean(0).tolist(), rel=1e-5)
        assert result["value_drain_per_layer"][layer] == pytest.approx(float(drains.mean()), rel=1e-5)
    assert result["residual_peak"] > 20  # the planted sink shows
    assert result["residual_peak"] == max(result["residual_peak_per_layer"])
    assert len(result["residual_peak_per_layer"]) == len(result["value_drain_per_layer"]) == 3


@pytest.mark.parametrize("gate_type", ["linear", "all_heads_linear", "elementwise", "mlp"])
def test_gate_statistics_of_set_gates(gate_type: str) -> None:
    torch.manual_seed(0)
    model = create_model("bert-tiny", AttentionSpec(kind="gated_attention", gate_type=gate_type)).eval()
    biases = torch.tensor([-20.0, 20.0, math.log(0.05 / 0.95), 0.0])  # closed, open, 0.05 and 0.5
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "attn_gate"):
                gate = module.attn_gate
                gate.weight.zero_()
                gate.bias.copy_(biases.repeat_interleave(gate.bias.numel() // 4))
    ids = torch.randint(5, 500, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    result = analyze(model, [{"input_ids": ids, "attention_mask": mask}])
    for layer in range(2):
        assert result["gate_closed_share_per_head"][layer] == [1.0, 0.0, 1.0, 0.0]
        assert result["gate_mean_per_head"][layer] == pytest.approx([0.0, 1.0, 0.05, 0.5], abs=1e-7)
        histogram = result["gate_histogram_per_head"][layer]
        assert histogram[0][0] == 1.0 and histogram[1][-1] == 1.0 and histogram[2][1] == 1.0
        assert histogram[3][10] == 1.0
    assert result["clipped_zero_share_per_head"] is None


@pytest.mark.parametrize("preset", ["opt-tiny", "bert-tiny"])
def test_clipped_zero_share_matches_paper_formula(preset: str) -> None:
    torch.manual_seed(0)
    gamma = -0.08
    model = create_model(preset, AttentionSpec(kind="clipped_softmax", gamma=gamma)).eval()
    ids = torch.randint(5, 500, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    result = analyze(model, [{"input_ids": ids, "attention_mask": mask}])

    captured: list[torch.Tensor] = []
    if preset == "opt-tiny":
        layers = model.model.decoder.layers
        hooks = [l.self_attn_layer_norm.register_forward_hook(lambda m, a, o: captured.append(o)) for l in layers]
        projections = [(l.self_attn.q_proj, l.self_attn.k_proj) for l in layers]
    else:
        layers = model.bert.encoder.layer
        hooks = [l.attention.self.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for l in layers]
        projections = [(l.attention.self.query, l.attention.self.key) for l in layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    valid = mask.bool()
    allowed = valid[:, :, None] & valid[:, None, :]
    if preset == "opt-tiny":
        allowed &= torch.ones(16, 16, dtype=torch.bool).tril()
    heads = model.config.num_attention_heads
    for layer, (x, (q_proj, k_proj)) in enumerate(zip(captured, projections)):
        with torch.no_grad():
            q = q_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.clamp((1 - gamma) * torch.softmax(scores, -1) + gamma, 0, 1)  # paper eq. 4.1, zeta = 1
        zeros = ((probs == 0) & allowed[:, None]).sum((0, 2, 3)).double() / allowed.sum()
        assert 0.05 < float(zeros.mean()) < 0.95  # a mix of zeros and non-zeros, so the count means something
        assert result["clipped_zero_share_per_head"][layer] == pytest.approx(zeros.tolist(), abs=1e-12)
