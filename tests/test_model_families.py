"""Every family x every attention variant builds, trains one step and round-trips save/from_pretrained."""

import pytest
import torch
from transformers import BertConfig
from transformers import BertForMaskedLM, OPTConfig, OPTForCausalLM

from quantizable import AttentionSpec, apply_attention_spec, create_model, load_model
from quantizable.models import attention_modules, get_family
from tests.conftest import TINY_PRESETS, tiny_batch

SPECS = {
    "vanilla": AttentionSpec(),
    "clipped": AttentionSpec(kind="clipped_softmax", gamma=-0.025),
    "softmax1": AttentionSpec(kind="softmax_plus_one"),
    **{f"gated-{g}": AttentionSpec(kind="gated_attention", gate_type=g, pi_init=0.25) for g in
       ("linear", "mlp", "all_heads_linear", "elementwise")},
}


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("name", list(SPECS))
def test_build_forward_backward_round_trip(preset, name, tmp_path):
    model = create_model(preset, SPECS[name])
    batch = tiny_batch(preset)
    labels = torch.randint(0, 10, (2,)) if preset.startswith("vit") else batch["input_ids"]
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    gates = [p for n, p in model.named_parameters() if ".attn_gate." in n]
    assert bool(gates) == name.startswith("gated")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gates)

    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = get_family(preset.split("-")[0]).task.auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.attention_spec == SPECS[name]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    assert torch.equal(load_model(tmp_path)(**batch).logits, expected)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_saturated_gates_reproduce_vanilla(preset):
    vanilla = create_model(preset, AttentionSpec()).eval()
    gated = apply_attention_spec(vanilla, AttentionSpec(kind="gated_attention", gate_type="linear")).eval()
    batch = tiny_batch(preset)
    with torch.no_grad():
        for module in attention_modules(gated):
            module.attn_gate.bias.fill_(50.0)
        assert torch.allclose(gated(**batch).logits, vanilla(**batch).logits, atol=1e-5)


def test_linear_gates_add_documented_parameter_count():
    vanilla = create_model("bert-tiny")
    gated = create_model("bert-tiny", AttentionSpec(kind="gated_attention"))
    layers, heads, head_dim = 2, 4, 16
    added = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in vanilla.parameters())
    assert added == layers * heads * (head_dim + 1)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_vanilla_matches_stock_transformers_sdpa(preset):
    """Our attention function is numerically the stock SDPA path for vanilla models."""
    ours = create_model(preset).eval()
    family = preset.split("-")[0]

    stock_config = get_family(family).config_class(**{k: v for k, v in ours.config.to_dict().items()
                                                      if k not in ("model_type", "attention_spec", "architectures")})
    stock_config._attn_implementation = "sdpa"
    stock = get_family(family).model_class(stock_config).eval()
    stock.load_state_dict(ours.state_dict())
    batch = tiny_batch(preset)
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, stock(**batch).logits, atol=1e-5)


def test_apply_spec_keeps_pretrained_weights_bit_identical():
    stock = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64))
    converted = apply_attention_spec(stock, AttentionSpec(kind="gated_attention", gate_type="mlp", pi_init=0.3))
    before = stock.state_dict()
    after = converted.state_dict()
    new = sorted(set(after) - set(before))
    assert new and all(".attn_gate." in k for k in new)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    gate_bias = converted.bert.encoder.layer[0].attention.self.attn_gate.bias
    assert torch.allclose(gate_bias, torch.logit(torch.tensor(0.3)))


def test_stock_opt_checkpoint_loads_and_converts(tmp_path):
    stock = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=64, max_position_embeddings=64))
    stock.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is OPTForCausalLM
    clipped = apply_attention_spec(loaded, AttentionSpec(kind="clipped_softmax", alpha=2, seq_len=64))
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert clipped(input_ids=ids).logits.shape == (2, 10, 300)


def test_vit_patch_layernorm_option(tmp_path):
    model = create_model("vit-tiny", patch_layernorm=True).eval()
    names = [n for n, _ in model.named_parameters() if "patch_layernorm" in n]
    assert names == ["vit.embeddings.patch_embeddings.patch_layernorm.weight",
                     "vit.embeddings.patch_embeddings.patch_layernorm.bias"]
    batch = tiny_batch("vit-tiny")
    with torch.no_grad():
        expected = model(**batch).logits
        model.vit.embeddings.patch_embeddings.patch_layernorm.weight.mul_(2.0)
        assert not torch.allclose(model(**batch).logits, expected)


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError, match="num_attention_heads"):
        create_model("bert-tiny", num_attention_heads=5)


def test_unknown_preset_and_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset"):
        create_model("bert-huge")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_model(tmp_path)


def test_padding_mask_respected_by_clipped_path():
    model = create_model("bert-tiny", AttentionSpec(kind="clipped_softmax", gamma=-0.025)).eval()
    ids = torch.randint(5, 512, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        short = model(input_ids=ids).logits
        long = model(input_ids=padded, attention_mask=mask).logits[:, :12]
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_materialised_path_equals_sdpa_path(preset):
    """gamma=0, zeta=1 clipped softmax (materialised probabilities, causal mask built by us) equals fused SDPA."""
    vanilla = create_model(preset).eval()
    unclipped = apply_attention_spec(vanilla, AttentionSpec(kind="clipped_softmax", gamma=0.0)).eval()
    batch = tiny_batch(preset)
    with torch.no_grad():
        assert torch.allclose(unclipped(**batch).logits, vanilla(**batch).logits, atol=1e-5)


def test_evaluate_perplexity_is_token_weighted():
    from quantizable.evaluation import evaluate

    model = create_model("opt-tiny")
    ids = torch.randint(0, 512, (4, 16))
    whole = evaluate(model, [{"input_ids": ids, "labels": ids}])
    split = evaluate(model, [{"input_ids": ids[:1], "labels": ids[:1]}, {"input_ids": ids[1:], "labels": ids[1:]}])
    assert whole["metric"] == "perplexity" and whole["count"] == 4 * 15
    assert whole["value"] == pytest.approx(split["value"], rel=1e-5)
    assert 300 < whole["value"] < 900  # near-uniform over 512 tokens at init
