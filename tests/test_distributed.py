"""Two CPU processes (gloo) under accelerate's own FSDP2 and DDP: same losses as one process at the same global
batch, checkpoint and --resume under FSDP, the saved model a normal save_pretrained folder whose attention settings
and added parameters (sink logits, gates) equal the one-process run's and load back with from_pretrained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantizable.training import load_config, train

# accelerate's FSDP plugin, read from the environment as `accelerate launch --config_file fsdp_cpu.yaml` sets it
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "OPTDecoderLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true"}
SETTINGS = ["run.steps=4", "run.log_every=1", "run.eval_batches=1", "run.checkpoint_every=2",
            "model.overrides.dropout=0.0"]
# What each two-process run trains. FSDP: the sink logits (a bare (heads,) parameter per layer, sharded across the
# ranks; this run is also cut and resumed from the sharded checkpoint) and clipped softmax (no parameters: alpha,
# zeta and a gamma warm-up that changes the modules' working spec every step must reach the saved config as
# configured). DDP: the gates (nn.Linear modules, which FSDP shards like q/k/v; an FSDP run trained them before).
CASES = {
    "fsdp-sink_logit": ("fsdp", ["attention.kind=sink_logit"], ".attn_sink_logit.logit"),
    "fsdp-clipped_softmax": ("fsdp", ["attention.kind=clipped_softmax", "attention.alpha=4", "attention.zeta=1.01",
                                      "optim.gamma_warmup_steps=2"], None),
    "ddp-gated_attention": ("ddp", ["attention.kind=gated_attention"], ".attn_gate."),
}


def _launch(out: Path, settings: list[str], extra_env: dict[str, str], *flags: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "quantizable.cli.main", "train", "--config", "opt-tiny", "--out", str(out), "--no-progress",
               *[arg for setting in settings for arg in ("--set", setting)], *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_at_the_same_global_batch(tmp_path: Path, case: str) -> None:
    kind, attention, added = CASES[case]
    settings = [*SETTINGS, *attention]
    single = train(load_config("opt-tiny", [*settings, "run.batch_size=8"]), tmp_path / "one", progress=False)
    env = FSDP_ENV if kind == "fsdp" else {}
    resume = case == "fsdp-sink_logit"  # cut after step 2 and resumed: the checkpoint holds the sharded state
    _launch(tmp_path / "two", [*settings, "run.batch_size=4"], env, *(["--stop-after", "2"] if resume else []))
    if resume:
        _launch(tmp_path / "two", [*settings, "run.batch_size=4"], env, "--resume")
    assert _losses(tmp_path / "two") == pytest.approx(single["losses"], rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["step"] == 4
    # a normal save_pretrained folder: the added parameters are there, gathered from the shards, equal to the
    # one-process run's, and load back as they were saved
    from transformers import AutoModelForCausalLM

    from quantizable.models.modeling import attention_modules

    saved = load_file(tmp_path / "two" / "model" / "model.safetensors")
    reference = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert saved.keys() == reference.keys()
    assert all(torch.allclose(saved[k], reference[k], atol=1e-4) for k in reference)
    if added is not None:
        ours = [key for key in saved if added in key]
        assert {key.split(".layers.")[1].split(".")[0] for key in ours} == {"0", "1"}  # both layers of opt-tiny
        assert all(saved[key].abs().max() > 0 for key in ours)  # sink logits start at 0: these were trained
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    configured = load_config("opt-tiny", settings).attention
    assert model.config.attention_spec == configured.to_dict()
    assert all(module.attention_spec == configured for module in attention_modules(model))
    if configured.kind == "clipped_softmax":  # as configured, not the warm-up's last working spec
        spec = model.config.attention_spec
        assert (spec["alpha"], spec["zeta"], spec["seq_len"], spec["gamma"]) == (4, 1.01, 64, None)
