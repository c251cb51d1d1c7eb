"""Two CPU processes (gloo) under accelerate's own FSDP2 and DDP: same losses as one process at the same global
batch, checkpoint and --resume under FSDP, the saved model a normal save_pretrained folder with its gates."""

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
            "model.overrides.dropout=0.0", "attention.kind=gated_attention"]


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
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path: Path, kind: str) -> None:
    single = train(load_config("opt-tiny", [*SETTINGS, "run.batch_size=8"]), tmp_path / "one", progress=False)
    env = FSDP_ENV if kind == "fsdp" else {}
    # FSDP is also cut after step 2 and resumed: the checkpoint holds the sharded state
    _launch(tmp_path / "two", [*SETTINGS, "run.batch_size=4"], env, *(["--stop-after", "2"] if kind == "fsdp" else []))
    if kind == "fsdp":
        _launch(tmp_path / "two", [*SETTINGS, "run.batch_size=4"], env, "--resume")
    assert _losses(tmp_path / "two") == pytest.approx(single["losses"], rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["step"] == 4
    # a normal save_pretrained folder: the gates are there, gathered from the shards, and load back
    from transformers import AutoModelForCausalLM

    saved = load_file(tmp_path / "two" / "model" / "model.safetensors")
    reference = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert any(".attn_gate." in key for key in saved) and saved.keys() == reference.keys()
    assert all(torch.allclose(saved[k], reference[k], atol=1e-4) for k in reference)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    assert model.config.attention_spec["kind"] == "gated_attention"
