"""Training: presets learn on the default data, resume is exact, DDP ranks agree, fine-tuning keeps weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantizable.cli.main import main as cli_main
from quantizable.models import load_model
from quantizable.training import TrainConfig, load_config, train
from quantizable.training.optim import lr_factor, make_optimizer, parameter_groups
from quantizable.training.checkpoint import weight_digest

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("default_data")  # conftest: the embedded corpus, prepared once


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["bert-tiny", "opt-tiny", "vit-tiny"])
def test_tiny_preset_learns_and_saves(preset: str, tmp_path: Path) -> None:
    config = load_config(preset, ["run.log_every=1", "run.outlier_every=15", "run.eval_every=30"])
    summary = train(config, tmp_path, progress=False)
    losses = summary["losses"]
    assert len(losses) == config.run.steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, config.run.steps + 1))
    outliers = [r for r in records if "max_inf_norm" in r]
    assert [r["step"] for r in outliers] == [15, 30]
    assert all(r["max_inf_norm"] > 0 and r["avg_kurtosis"] >= 1.0 for r in outliers)
    assert summary["eval"]["metric"] == ("accuracy" if preset.startswith("vit") else "perplexity")
    assert load_config(tmp_path / "config.yaml") == config
    assert weight_digest(load_model(tmp_path).state_dict()) == summary["weight_digests"][0]
    assert (tmp_path / "tb").is_dir() and (tmp_path / "summary.json").is_file()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    # MLM: masking, dropout and data order must all be restored; accumulation crosses checkpoint boundaries.
    config = load_config("bert-tiny", ["run.steps=6", "run.log_every=1", "run.checkpoint_every=2",
                                       "optim.grad_accum=2"])
    full = train(config, tmp_path / "full", progress=False)["losses"]
    first = train(config, tmp_path / "cut", stop_after=3, progress=False)
    assert not first["finished"] and len(first["losses"]) == 3
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_3"]  # only the last good one
    rest = train(config, tmp_path / "cut", resume=True, progress=False)["losses"]
    assert first["losses"] + rest == pytest.approx(full, abs=1e-6)
    assert [r["step"] for r in _metrics(tmp_path / "cut")] == list(range(1, 7))


@pytest.mark.slow
def test_two_processes_agree_on_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "quantizable.cli.main", "train", "--config", "opt-tiny", "--set", "run.steps=3",
               "--set", "run.eval_batches=1", "--out", str(tmp_path), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(summary["weight_digests"]) == 2 and len(set(summary["weight_digests"])) == 1


def test_init_from_keeps_pretrained_weights(tmp_path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    from quantizable.data import load_tokenizer

    tokenizer = load_tokenizer("bpe")
    stock = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32,
                                     num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                     max_position_embeddings=128))
    stock.save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")
    config = load_config("opt-tiny", ["run.steps=0", "run.eval_batches=1", "attention.kind=gated_attention",
                                      "attention.pi_init=0.25"])
    summary = train(config, tmp_path / "run", init_from=tmp_path / "pretrained", progress=False)
    assert summary["task"] == "clm"
    before = load_file(tmp_path / "pretrained" / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    added = sorted(set(after) - set(before))
    assert added and all(".attn_gate." in k for k in added)
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    # And fine-tuning actually trains from there.
    tuned = train(load_config("opt-tiny", ["run.steps=2", "run.eval_batches=1", "attention.kind=gated_attention"]),
                  tmp_path / "tuned", init_from=tmp_path / "pretrained", progress=False)
    assert len(tuned["losses"]) == 2


def test_config_overrides_and_round_trip(tmp_path: Path) -> None:
    config = load_config("opt-125m", ["optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "attention.kind=clipped_softmax",
                                      "attention.alpha=12", "model.overrides.dropout=0.0", "data.source=null"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.optim.betas == [0.8, 0.9] and config.optim.grad_accum == 4 and config.run.batch_size == 48
    assert config.attention.seq_len == 512 and config.attention.resolved_gamma() == pytest.approx(-12 / 512)
    config.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert TrainConfig.from_dict(config.to_dict()) == config
    for name in ("bert-cpu", "opt-cpu", "vit-cpu", "bert-base", "bert-6l", "vit-s16", "llama-finetune-cpu",
                 "bert-finetune-cpu"):
        load_config(name)


def test_optimizer_groups_and_schedule() -> None:
    from quantizable.models import create_model

    config = load_config("opt-tiny")
    model = create_model("opt-tiny")
    decay, no_decay = parameter_groups(model, config.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "layer_norm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert any("layer_norm.weight" in names[id(p)] for p in no_decay["params"])
    config.optim.decay_layernorm_gamma = True
    decay, no_decay = parameter_groups(model, config.optim)
    assert all(names[id(p)].endswith("bias") for p in no_decay["params"])
    config.optim.warmup_steps, config.optim.final_lr_fraction = 10, 0.1
    assert lr_factor(0, 110, config.optim) == pytest.approx(0.1)
    assert lr_factor(9, 110, config.optim) == pytest.approx(1.0)
    assert lr_factor(60, 110, config.optim) == pytest.approx(0.55)
    assert lr_factor(110, 110, config.optim) == pytest.approx(0.1)
    config.optim.schedule = "cosine"
    assert lr_factor(60, 110, config.optim) == pytest.approx(0.55)


def test_optimizer_is_fused_adamw_with_the_loop_versions_updates() -> None:
    from quantizable.models import create_model

    config = load_config("opt-tiny")
    models = [create_model("opt-tiny") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], config.optim)
    loop = torch.optim.AdamW(parameter_groups(models[1], config.optim), lr=config.optim.lr,
                             betas=tuple(config.optim.betas), eps=config.optim.eps, foreach=False)
    assert fused.defaults["fused"]
    for step in range(3):
        for model in models:
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        fused.step()
        loop.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    config.optim.fused = False
    assert not make_optimizer(models[0], config.optim).defaults["fused"]


def test_gate_lr_scale_gives_only_the_gates_a_larger_learning_rate() -> None:
    from quantizable.attention import AttentionSpec
    from quantizable.models import create_model

    config = load_config("opt-tiny", ["optim.gate_lr_scale=30"])
    model = create_model("opt-tiny", AttentionSpec(kind="gated_attention", gate_type="linear"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, config.optim)
    fast = [g for g in groups if g["lr"] == pytest.approx(30 * config.optim.lr)]
    assert fast and all(".attn_gate." in names[id(p)] for g in fast for p in g["params"])
    assert sum(len(g["params"]) for g in fast) == sum(1 for n in names.values() if ".attn_gate." in n)
    assert sum(len(g["params"]) for g in groups) == len(names)
    with pytest.raises(ValueError, match="gate_lr_scale"):
        load_config("opt-tiny", ["optim.gate_lr_scale=0"])


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="unknown training preset 'nope'.*bert-tiny"):
        load_config("nope")
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'.*optim.lr"):
        load_config("bert-tiny", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown config key.*'bogus'"):
        load_config("bert-tiny", ["bogus.x=1"])
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        load_config("bert-tiny", ["optim.schedule=step"])
    with pytest.raises(ValueError, match="run.steps has the wrong type"):
        load_config("bert-tiny", ["run.steps=many"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown model preset 'bert-huge'.*bert-small"):
        train(load_config("bert-tiny", ["model.preset=bert-huge"]), tmp_path / "huge", progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        train(load_config("bert-tiny", ["data.seq_len=256"]), tmp_path / "long", progress=False)
    with pytest.raises(FileNotFoundError, match="missing-corpus"):
        train(load_config("opt-tiny", [f"data.source={tmp_path}/missing-corpus.txt"]), tmp_path / "src", progress=False)
    run_dir = tmp_path / "done"
    assert cli_main(["train", "--config", "vit-tiny", "--set", "run.steps=1", "--set", "run.eval_batches=1",
                     "--out", str(run_dir), "--no-progress"]) == 0
    assert cli_main(["train", "--config", "vit-tiny", "--out", str(run_dir)]) == 2
    assert "finished run" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step(tmp_path: Path, monkeypatch) -> None:
    from quantizable.training import TrainingDivergedError, trainer

    original = trainer.build_model

    def poisoned(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model, tokenizer

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with pytest.raises(TrainingDivergedError, match="at step 1"):
        train(load_config("vit-tiny", ["run.steps=3"]), tmp_path, progress=False)


def test_cli_stop_and_resume_from_the_run_dir(tmp_path: Path, capsys) -> None:
    common = ["--out", str(tmp_path), "--no-progress"]
    assert cli_main(["train", "--config", "vit-tiny", "--set", "run.steps=4", "--set", "run.eval_batches=1",
                     "--stop-after", "2", *common]) == 0
    assert (tmp_path / "checkpoints" / "step_2").is_dir() and not (tmp_path / "model").exists()
    assert cli_main(["train", "--config", "vit-tiny", *common]) == 2  # unfinished run: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["train", "--resume", *common]) == 0  # config read back from RUN_DIR/config.yaml
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 4
    assert load_model(tmp_path).config.num_hidden_layers == 2


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_cpu_training_keeps_freed_memory(monkeypatch) -> None:
    from quantizable.training.allocator import keep_freed_memory

    def resident_mib() -> float:
        line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    monkeypatch.setenv("QUANTIZABLE_KEEP_FREED_MEMORY", "0")
    assert not keep_freed_memory()
    monkeypatch.delenv("QUANTIZABLE_KEEP_FREED_MEMORY")
    assert keep_freed_memory()
    block = torch.ones(16 * 2**20)  # 64 MiB, touched: glibc would have mapped it and unmapped it on free
    held = resident_mib()
    del block
    assert resident_mib() > held - 32  # freed, but kept by the process for the next step's buffers
