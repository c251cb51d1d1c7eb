"""The comparison no-op mechanisms (docs/mechanisms.md): each kind's numerics against its paper's formula written out
directly, masks, gradients, parameter counts, save/load, conversion, quantization, analysis and export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantizable.attention import KINDS, AttentionSpec, spec_for_method
from quantizable.attention.interface import quantizable_attention_forward
from quantizable.attention.no_op import AttentionSink, SinkLogit, ValueGate
from quantizable.attention.softmax import sigmoid_attention, softmax_plus_one, softpick
from quantizable.models import FAMILIES, Task, apply_attention_spec, create_model, load_model
from tests.conftest import TINY_PRESETS, tiny_batch

torch.set_num_threads(1)

NEW_KINDS = ("sink_token", "key_bias", "sigmoid", "softpick", "value_gate", "sink_logit")
ON_SDPA = ("sink_token", "key_bias", "value_gate")  # keep softmax: no materialised probabilities without taps
B, H, H_KV, T, D = 2, 4, 2, 5, 3


# ---------------------------------------------------------------- the formulas, written out per query row


def _reference(kind: str, q, k, v, allowed, scaling: float, params: dict, spec: AttentionSpec) -> torch.Tensor:
    """``(B, T, H, D)`` attention output from the papers' definitions, one query row at a time.

    ``allowed`` ``(B, T, T)`` says which keys each query may attend (padding and causality); k/v have ``H_KV`` heads,
    shared by ``H / H_KV`` query heads.
    """
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    groups = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            g = h // groups
            for i in range(q.shape[2]):
                keys = [j for j in range(k.shape[2]) if allowed[b, i, j]]
                x = torch.stack([q[b, h, i] @ k[b, g, j] * scaling for j in keys]) if keys else q.new_zeros(0)
                vals = [v[b, g, j] for j in keys]
                if kind in ("sink_token", "key_bias"):  # softmax(q [K; k']) [V; v'], v' = 0 for key_bias
                    x = torch.cat([x, (q[b, h, i] @ params["key"][g] * scaling)[None]])
                    vals = [*vals, params["value"][g] if kind == "sink_token" else torch.zeros_like(v[b, g, 0])]
                    w = torch.exp(x) / torch.exp(x).sum()
                elif kind == "sink_logit":  # exp(x_j) / (exp(s_h) + sum exp(x)): a learned column, dropped
                    w = torch.exp(x) / (torch.exp(params["logit"][h]) + torch.exp(x).sum())
                elif kind == "sigmoid":  # sigmoid(x - log T), T the key length of the row
                    w = 1 / (1 + torch.exp(-(x - math.log(spec.seq_len or k.shape[2]))))
                elif kind == "softpick":  # relu(e^x - 1) / (sum |e^x - 1| + eps e^max): the paper's eps, shifted
                    if not keys:
                        continue
                    w = torch.relu(torch.exp(x) - 1) / ((torch.exp(x) - 1).abs().sum() + spec.eps * torch.exp(x.max()))
                elif kind == "value_gate":  # softmax(q K) (sigmoid(w . v_j + b) v_j)
                    w = torch.exp(x) / torch.exp(x).sum()
                    vals = [vj * torch.sigmoid(vj @ params["weight"][g] + params["bias"][g]) for vj in vals]
                for wj, vj in zip(w, vals):
                    out[b, i, h] += wj * vj
    return out


class _Attention(nn.Module):
    """The attributes an attention module hands the attention function (as installed by ``QuantizableMixin``)."""

    def __init__(self, spec: AttentionSpec, causal: bool, probs_tap: bool) -> None:
        super().__init__()
        self.attention_spec, self.num_key_value_groups, self.is_causal = spec, H // H_KV, causal
        if spec.extra_key:
            self.attn_sink = AttentionSink(spec, H_KV, D, init_std=0.5)
        if spec.kind == "value_gate":
            self.attn_value_gate = ValueGate(spec, H_KV, D, init_std=0.5)
        if spec.kind == "sink_logit":
            self.attn_sink_logit = SinkLogit(H)
        if probs_tap:  # forces the materialised path, as quantization and analysis do
            self.attention_taps = {"probs": lambda p: p}

    def forward(self, q, k, v, mask):
        return quantizable_attention_forward(self, q, k, v, mask)[0]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_KV, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_KV, T, D, generator=g, dtype=torch.float64)
    return q, k, v


def _masks(case: str):
    """``(mask handed to the attention function, allowed (B, T, T), causal)`` for each masking case."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    padded = torch.ones(B, 1, T, T, dtype=torch.bool)
    padded[1, ..., -2:] = False  # batch 1: the last two keys are padding
    if case == "none":
        return None, torch.ones(B, T, T, dtype=torch.bool), False
    if case == "causal":  # no mask: the function builds the causal one (HF skips it when it can)
        return None, causal.expand(B, T, T), True
    if case == "padded":
        return padded, padded[:, 0], False
    if case == "causal_padded_float":  # an additive float mask, as eager HF masks are
        allowed = padded[:, 0] & causal
        minimum = torch.finfo(torch.float64).min
        mask = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~allowed[:, None], minimum)
        return mask, allowed, True
    if case == "fully_masked_row":  # batch 1, query 0 may attend no token (only a sink)
        mask = padded.clone()
        mask[1, :, 0] = False
        return mask, mask[:, 0], False
    raise ValueError(case)


MASK_CASES = ("none", "causal", "padded", "causal_padded_float", "fully_masked_row")


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("materialised", [False, True])
def test_attention_matches_the_papers_formula(kind: str, case: str, materialised: bool) -> None:
    if case == "fully_masked_row" and kind == "value_gate":
        pytest.skip("plain softmax over no key is undefined (SDPA gives 0, the materialised path a uniform row)")
    spec = spec_for_method(kind)
    module = _Attention(spec, causal=_masks(case)[2], probs_tap=materialised).double()
    with torch.no_grad():  # a non-zero gate bias, so that the value gate is not symmetric around 0.5
        if kind == "value_gate":
            module.attn_value_gate.bias.copy_(torch.tensor([0.3, -0.7]))
        if kind == "sink_logit":  # one logit per query head, not all at the init's 0
            module.attn_sink_logit.logit.copy_(torch.tensor([0.0, 1.5, -2.0, 0.4]))
    q, k, v = _inputs()
    mask, allowed, _ = _masks(case)
    params = {name.split(".")[-1]: p.detach() for name, p in module.named_parameters()}
    expected = _reference(kind, q, k, v, allowed, D ** -0.5, params, spec)
    torch.testing.assert_close(module(q, k, v, mask), expected, atol=1e-10, rtol=1e-9)


def test_sigmoid_uses_the_configured_length_when_given() -> None:
    spec = AttentionSpec(kind="sigmoid", seq_len=64)
    module = _Attention(spec, causal=False, probs_tap=False).double()
    q, k, v = _inputs()
    allowed = torch.ones(B, T, T, dtype=torch.bool)
    torch.testing.assert_close(module(q, k, v, None), _reference("sigmoid", q, k, v, allowed, D ** -0.5, {}, spec))


def test_hand_computed_values() -> None:
    # softpick([0, ln 2, ln 3]): e^x - 1 = [0, 1, 2] -> [0, 1/3, 2/3]; [-ln 2, ln 2]: [-1/2, 1] -> [0, 1/1.5]
    x = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    torch.testing.assert_close(softpick(x, eps=1e-30), torch.tensor([[0.0, 1 / 3, 2 / 3]], dtype=torch.float64))
    x = torch.tensor([[-math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    torch.testing.assert_close(softpick(x, eps=1e-30), torch.tensor([[0.0, 2 / 3]], dtype=torch.float64))
    # a row of non-positive scores is all zero: the head does nothing
    assert torch.all(softpick(torch.tensor([[-3.0, -0.5, 0.0]])) == 0)
    # sigmoid(0 - log 4) = 1/5
    assert sigmoid_attention(torch.zeros(1, 4))[0].tolist() == pytest.approx([0.2] * 4)
    # key_bias with a zero key is softmax+1: the extra logit is q . 0 = 0 and its value is 0
    module = _Attention(AttentionSpec(kind="key_bias"), causal=False, probs_tap=True).double()
    with torch.no_grad():
        module.attn_sink.key.zero_()
    q, k, v = _inputs()
    probs = softmax_plus_one(torch.matmul(q, k.repeat_interleave(2, dim=1).transpose(2, 3)) * D ** -0.5)
    expected = torch.matmul(probs, v.repeat_interleave(2, dim=1)).transpose(1, 2)
    torch.testing.assert_close(module(q, k, v, None), expected)


def test_sink_logit_at_zero_is_softmax_plus_one_and_learns() -> None:
    """gpt-oss's sink column with its logit at 0 (the init) is exp(x_i) / (1 + sum_j exp(x_j)); the logit trains."""
    module = _Attention(AttentionSpec(kind="sink_logit"), causal=False, probs_tap=False).double()
    assert torch.equal(module.attn_sink_logit.logit, torch.zeros(H, dtype=torch.float64))
    q, k, v = _inputs()
    x = torch.matmul(q, k.repeat_interleave(H // H_KV, dim=1).transpose(2, 3)) * D ** -0.5
    probs = torch.exp(x) / (1 + torch.exp(x).sum(-1, keepdim=True))
    expected = torch.matmul(probs, v.repeat_interleave(H // H_KV, dim=1)).transpose(1, 2)
    out = module(q, k, v, None)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    out.square().sum().backward()
    assert module.attn_sink_logit.logit.grad is not None and torch.all(module.attn_sink_logit.logit.grad != 0)


def test_softpick_masked_entries_contribute_nothing() -> None:
    x = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    valid = torch.tensor([[True, False, True, True]])
    expected = torch.zeros_like(x)
    expected[:, [0, 2, 3]] = softpick(x[:, [0, 2, 3]])  # as if the masked key were not there
    torch.testing.assert_close(softpick(x, valid), expected)
    assert softpick(x, torch.zeros_like(valid)).abs().sum() == 0  # an all-masked row is 0, not NaN


def test_functions_gradcheck() -> None:
    x = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    x_away_from_zero = (x.detach() + 0.3 * torch.sign(x.detach())).requires_grad_()  # relu kink at x = 0
    assert torch.autograd.gradcheck(lambda t: softpick(t, valid), (x_away_from_zero,))
    assert torch.autograd.gradcheck(lambda t: sigmoid_attention(t), (x,))
    assert torch.autograd.gradcheck(lambda t: sigmoid_attention(t, seq_len=64), (x,))


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("materialised", [False, True])
def test_attention_gradcheck(kind: str, materialised: bool) -> None:
    """Gradients of q, k, v and the kind's own parameters, padded and causal."""
    module = _Attention(spec_for_method(kind), causal=True, probs_tap=materialised).double()
    mask, _, _ = _masks("causal_padded_float")
    mask = mask > torch.finfo(torch.float64).min / 2  # bool: the float form is checked above
    names = [name for name, _ in module.named_parameters()]
    q, k, v = (t.requires_grad_() for t in _inputs(1))
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    if kind == "softpick":  # away from the relu kink: no score exactly at 0
        q = (q.detach() * 1.7).requires_grad_()

    def run(q, k, v, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (q, k, v, mask))

    assert torch.autograd.gradcheck(run, (q, k, v, *params))


# ---------------------------------------------------------------- in every family


def _geometry(preset: str) -> tuple[int, int, int, int]:
    """(layers, heads, kv heads, head dim) of a tiny preset."""
    config = create_model(preset).config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, heads, kv_heads, config.hidden_size // heads


PER_LAYER = {
    "sink_token": lambda h, kv, d: 2 * kv * d,  # a key and a value per kv-head
    "key_bias": lambda h, kv, d: kv * d,  # a key per kv-head; its value is exactly zero
    "sigmoid": lambda h, kv, d: 0,
    "softpick": lambda h, kv, d: 0,
    "value_gate": lambda h, kv, d: kv * (d + 1),  # w_h (d) and b_h per kv-head
    "sink_logit": lambda h, kv, d: h,  # a logit per query head
}


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_parameter_counts(preset: str, kind: str) -> None:
    layers, *geometry = _geometry(preset)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    extra = count(create_model(preset, spec_for_method(kind))) - count(create_model(preset))
    assert extra == layers * PER_LAYER[kind](*geometry)


def _batch(preset: str, padded: bool = True) -> dict[str, torch.Tensor]:
    batch = tiny_batch(preset, length=12)
    if padded and "attention_mask" in batch:
        batch["attention_mask"][1, -3:] = 0
    return batch


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_save_load_round_trip_and_training_step(tmp_path, preset: str, kind: str) -> None:
    model = create_model(preset, spec_for_method(kind))
    batch = _batch(preset)
    labels = torch.tensor([1, 2]) if preset.startswith("vit") else batch["input_ids"]
    loss = model(**batch, labels=labels).loss
    loss.backward()
    added = [p for n, p in model.named_parameters()
             if any(f".{m}." in n for m in ("attn_sink", "attn_value_gate", "attn_sink_logit"))]
    assert bool(added) == (PER_LAYER[kind](1, 1, 1) > 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in added)  # they train
    model.eval()
    model.save_pretrained(tmp_path / "model")
    assert f'"kind": "{kind}"' in (tmp_path / "model" / "config.json").read_text()
    loaded = load_model(tmp_path / "model")
    assert loaded.attention_spec == model.attention_spec
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
        # the SDPA path and the materialised one (taps, output_attentions) agree
        observed = model(**batch, output_attentions=True)
        torch.testing.assert_close(observed.logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    for probs in observed.attentions:  # token columns only, rows sum to at most 1 except for sigmoid
        assert probs.shape[-1] == probs.shape[-2] and torch.all(probs >= 0)
        if kind != "sigmoid":
            assert torch.all(probs.sum(-1) <= 1 + 1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_apply_attention_spec_keeps_pretrained_weights(preset: str, kind: str) -> None:
    base = create_model(preset).eval()
    converted = apply_attention_spec(base, spec_for_method(kind))
    state = converted.state_dict()
    assert all(torch.equal(state[name], value) for name, value in base.state_dict().items())
    assert converted.attention_spec.kind == kind


@pytest.mark.parametrize("preset", [p for p in TINY_PRESETS if FAMILIES[p.split("-")[0]].task is Task.CLM])
def test_sink_with_kv_cache_matches_full_forward(preset: str) -> None:
    model = create_model(preset, spec_for_method("sink_token")).eval()
    ids = tiny_batch(preset, batch=1, length=10)["input_ids"]
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_quantization_and_analysis_see_token_columns(kind: str) -> None:
    from quantizable.analysis import recording
    from quantizable.quantization import QuantConfig, calibrate, freeze, quantize_

    preset = {"sink_token": "llama-tiny", "key_bias": "bert-tiny", "sigmoid": "opt-tiny", "softpick": "vit-tiny",
              "value_gate": "llama-tiny", "sink_logit": "opt-tiny"}[kind]
    model = create_model(preset, spec_for_method(kind)).eval()
    batch = _batch(preset)
    with torch.no_grad():
        reference = model(**batch).logits
    handle = quantize_(model, QuantConfig(weight_bits=16, act_bits=16))
    assert not any(".attn_sink" in n or ".attn_value_gate" in n for n in [*handle.weight_quantizers,
                                                                         *handle.act_quantizers])
    calibrate(model, [batch])
    freeze(model)  # every site, the attention taps included, saw data
    with torch.no_grad():
        quantized = model(**batch).logits
    handle.remove()
    assert ((quantized - reference).norm() / reference.norm()) < 1e-3
    shapes = []
    with recording(model, lambda layer, name, x: shapes.append(tuple(x.shape)) if name == "probs" else None,
                   with_attention=True), torch.no_grad():
        model(**batch)
    assert shapes and all(s[-1] == s[-2] for s in shapes)


EXPORT_CASES = [("opt-tiny", "sink_token"), ("bert-tiny", "key_bias"), ("llama-tiny", "sigmoid"),
                ("vit-tiny", "softpick"), ("opt-tiny", "value_gate"), ("llama-tiny", "sink_logit")]


@pytest.mark.parametrize("preset,kind", EXPORT_CASES)
def test_onnx_int8_export(tmp_path, preset: str, kind: str) -> None:
    from tests.test_export import _logits, _ort_logits, _saved_model

    from quantizable.export import export_onnx, quantize_onnx

    model = _saved_model(tmp_path, preset, kind)
    fp32 = export_onnx(model, tiny_batch(preset), tmp_path / "fp32.onnx")
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", [tiny_batch(preset, batch=4, seed=s) for s in (1, 2)])
    batch = tiny_batch(preset, batch=3, length=24, seed=7)
    reference = _logits(model, batch)
    torch.testing.assert_close(_ort_logits(fp32, batch), reference, atol=1e-4, rtol=1e-4)
    assert 0 < ((_ort_logits(int8, batch) - reference).norm() / reference.norm()) < 0.15


# ---------------------------------------------------------------- the spec


def test_every_kind_has_a_default_spec() -> None:
    assert set(NEW_KINDS) <= set(KINDS)
    for kind in NEW_KINDS:  # reproduce --methods builds AttentionSpec(kind=...), per-family settings defaulting to {}
        assert AttentionSpec(kind=kind) == spec_for_method(kind)
    assert [spec_for_method(kind).kind for kind in KINDS] == list(KINDS)
    assert [k for k in KINDS if spec_for_method(k).needs_probabilities] == [
        "clipped_softmax", "softmax_plus_one", "sigmoid", "softpick", "sink_logit"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="sigmoid", seq_len=0), "seq_len"),
    (dict(kind="sigmoid", seq_len=12.5), "seq_len"),
    (dict(kind="softpick", eps=0.0), "eps"),
    (dict(kind="softpick", eps=float("nan")), "eps"),
    (dict(kind="value_gate", pi_init=1.0), "pi_init"),
    (dict(kind="sink"), "sink_token"),  # the message lists the kinds
])
def test_bad_values_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        AttentionSpec(**kwargs)


def test_describe() -> None:
    assert AttentionSpec(kind="sigmoid", seq_len=128).describe() == "sigmoid attention (b = -log 128)"
    assert AttentionSpec(kind="sink_token").describe() == "sink token"
