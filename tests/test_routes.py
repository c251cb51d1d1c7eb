"""Routes to W8A8 besides the attention kinds (issue 33): Muon, single-scale norms, the embedding projection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quantizable.attention import spec_for_method
from quantizable.models import create_model, load_model
from quantizable.models.families import is_norm
from quantizable.models.structure import SingleScaleNorm
from quantizable.training import TrainConfig, load_config, train
from quantizable.training.config import OptimConfig
from quantizable.training.optim import Muon, MuonAdamW, make_optimizer, orthogonalise
from tests.conftest import tiny_batch

torch.set_num_threads(1)

OSP = {"single_scale_norm": True, "embedding_projection": True}


@pytest.mark.parametrize("preset", ["bert-tiny", "opt-tiny", "gpt2-tiny", "llama-tiny", "vit-tiny"])
def test_muon_gets_exactly_the_hidden_matrices(preset: str) -> None:
    model = create_model(preset, **OSP)
    optimizer = make_optimizer(model, OptimConfig(name="muon"))
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    layers = model.config.num_hidden_layers
    # per block: q, k, v, out and two MLP matrices (Llama: three; GPT-2: fused qkv, out, two MLP)
    per_block = {"llama": 7, "gpt2": 4}.get(preset.split("-")[0], 6)
    assert len(muon) == layers * per_block
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 2 and n.endswith("weight") for n in muon)
    assert not any(word in n for n in muon for word in ("embed", "wte", "wpe", "norm", "ln_", "head", "classifier",
                                                        "attn_", "embedding_projection"))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_our_muon_equals_torchs_in_bfloat16_and_stays_close_in_float32(shape: tuple[int, int]) -> None:
    """Three steps of torch.optim.Muon against ours: bit for bit with the iteration in bfloat16 (torch's dtype),
    within 3% of the total update in float32 (measured 0.8-0.9%: bf16 rounding, not a different algorithm)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator)
    params = [nn.Parameter(start.clone()) for _ in range(3)]
    settings = {"lr": 0.01, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    optimizers = [torch.optim.Muon([params[0]], **settings),
                  Muon([params[1]], orthogonalise_dtype=torch.bfloat16, **settings),
                  Muon([params[2]], **settings)]  # on CPU: float32
    for _ in range(3):
        grad = torch.randn(shape, generator=generator)
        for param, optimizer in zip(params, optimizers):
            param.grad = grad.clone()
            optimizer.step()
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)
    torchs, ours = params[0] - start, params[2] - start
    assert (ours - torchs).norm() / torchs.norm() < 0.03


def test_orthogonalise_approximates_the_svd_polar_factor() -> None:
    """Newton-Schulz output against U V^T from torch.linalg.svd: same direction, singular values near 1 (the
    quintic's coefficients trade exactness for speed: Jordan et al. report roughly 0.5-1.5)."""
    update = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    polar = u @ vh
    ours = orthogonalise(update, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(ours)
    assert 0.5 < singular.min() and singular.max() < 1.5
    assert (ours * polar).sum() / (ours.norm() * polar.norm()) > 0.97


def test_muon_and_adamw_step_and_checkpoint_together() -> None:
    model = create_model("opt-tiny")
    optimizer = make_optimizer(model, OptimConfig(name="muon", lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.grad is not None)
    state = optimizer.state_dict()
    again = make_optimizer(model, OptimConfig(name="muon", lr=1e-3))
    again.load_state_dict(state)
    assert again.muon.state_dict()["state"].keys() == optimizer.muon.state_dict()["state"].keys()
    for group in optimizer.param_groups:  # the schedule sets lr on the shared groups: both optimizers follow
        group["lr"] = 0.5e-3
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[0]["lr"] == 0.5e-3


@pytest.mark.parametrize("norm", [nn.LayerNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-6)])
def test_single_scale_norm_is_the_norm_with_its_gain_broadcast(norm: nn.Module) -> None:
    with torch.no_grad():
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
        single = SingleScaleNorm.replacing(norm)
        single.weight.fill_(1.7)
        norm.weight.fill_(1.7)
    assert single.weight.shape == (1,) and is_norm(single)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 1
    torch.testing.assert_close(single.double()(x), norm.double()(x))


@pytest.mark.parametrize("preset", ["bert-tiny", "opt-tiny", "gpt2-tiny", "llama-tiny", "vit-tiny"])
def test_structure_replaces_every_norm_and_reloads(tmp_path: Path, preset: str) -> None:
    model = create_model(preset, **OSP).eval()
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(isinstance(m, SingleScaleNorm) and m.weight.numel() == 1 for m in norms)
    projection = model.get_input_embeddings().embedding_projection
    assert torch.equal(projection.weight, torch.eye(projection.weight.shape[0]))  # starts as no projection
    batch = tiny_batch(preset, length=12)
    with torch.no_grad():  # the projection is in the forward: a non-identity one changes the output
        projection.weight.mul_(0.5)
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model").eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=0, rtol=0)


@pytest.mark.usefixtures("default_data")  # conftest: the embedded corpus, prepared once
def test_route_settings_round_trip_through_config_yaml(tmp_path: Path) -> None:
    config = load_config("opt-tiny", ["optim.name=muon", "model.norm=single_scale", "model.embedding_projection=true",
                                      "run.steps=3", "run.log_every=1"])
    assert TrainConfig.from_dict(config.to_dict()) == config
    summary = train(config, tmp_path, progress=False)
    assert len(summary["losses"]) == 3
    assert load_config(tmp_path / "config.yaml") == config
    model = load_model(tmp_path)
    assert model.config.single_scale_norm and model.config.embedding_projection
    with pytest.raises(ValueError, match="optim.name"):
        load_config("opt-tiny", ["optim.name=sgd"])
    with pytest.raises(ValueError, match="model.norm"):
        load_config("opt-tiny", ["model.norm=batch"])


# ---------------------------------------------------------------- quantization-aware training


def test_qat_forward_is_the_simulators_and_its_gradient_reaches_the_weights() -> None:
    import copy

    from quantizable.quantization import QuantConfig, calibrate, freeze, quantize_
    from quantizable.training.qat import parse_setting, prepare_qat

    assert parse_setting("W8A4") == QuantConfig(weight_bits=8, act_bits=4)
    model = create_model("opt-tiny", spec_for_method("sink_logit")).eval()
    simulated = copy.deepcopy(model)
    batches = [tiny_batch("opt-tiny", length=12, seed=s) for s in (1, 2)]
    prepare_qat(model, QuantConfig(), batches)
    quantize_(simulated, QuantConfig())
    calibrate(simulated, batches)
    freeze(simulated)
    batch = tiny_batch("opt-tiny", length=12, seed=3)
    with torch.no_grad():
        expected = simulated(**batch).logits
    out = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, create_model("opt-tiny", spec_for_method("sink_logit")).eval()(**batch).logits)
    out.loss.backward()
    originals = [p for n, p in model.named_parameters() if n.endswith("parametrizations.weight.original")]
    assert originals and all(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)


@pytest.mark.usefixtures("default_data")
def test_qat_fine_tune_saves_a_normal_model(tmp_path: Path) -> None:
    base = load_config("opt-tiny", ["run.steps=2"])
    train(base, tmp_path / "fp", progress=False)
    config = load_config("opt-tiny", ["run.steps=2", "qat.setting=w8a8", "qat.calibration_batches=2"])
    assert TrainConfig.from_dict(config.to_dict()) == config
    from quantizable.cli.main import main  # the user's form: train --qat w8a8 --init-from RUN

    assert main(["train", "--config", "opt-tiny", "--init-from", str(tmp_path / "fp"), "--qat", "w8a8", "--set",
                 "run.steps=2", "--set", "qat.calibration_batches=2", "--no-progress", "--out",
                 str(tmp_path / "qat")]) == 0
    assert TrainConfig.from_run(tmp_path / "qat").qat.setting == "w8a8"
    fp, qat = load_model(tmp_path / "fp"), load_model(tmp_path / "qat")
    assert qat.state_dict().keys() == fp.state_dict().keys()  # no quantizer left in the saved model
    assert any(not torch.equal(a, b) for a, b in zip(qat.state_dict().values(), fp.state_dict().values()))
    with pytest.raises(ValueError, match="qat.setting"):
        load_config("opt-tiny", ["qat.setting=int8"])


@pytest.mark.usefixtures("default_data")
def test_init_from_refuses_an_architecture_setting_the_checkpoint_lacks(tmp_path: Path) -> None:
    """model.norm / embedding_projection / registers build the architecture; a fine-tune takes the checkpoint's, so
    asking for one it lacks is an error (it was silently ignored), while repeating the checkpoint's own is fine."""
    train(load_config("opt-tiny", ["run.steps=1", "model.embedding_projection=true"]), tmp_path / "osp",
          progress=False)
    train(load_config("opt-tiny", ["run.steps=1", "model.embedding_projection=true"]), tmp_path / "again",
          init_from=tmp_path / "osp", progress=False)
    with pytest.raises(ValueError, match="single_scale_norm=True.*--init-from"):
        train(load_config("opt-tiny", ["run.steps=1", "model.norm=single_scale"]), tmp_path / "refused",
              init_from=tmp_path / "osp", progress=False)
    assert not (tmp_path / "refused").exists()
