"""GPU-class settings on CPU: ``run.compile=true`` (torch.compile through accelerate) trains like eager."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from quantizable.training import load_config, train


@pytest.mark.parametrize("attention", [["attention.kind=clipped_softmax", "attention.gamma=-0.025"],
                                       ["attention.kind=gated_attention"]])
def test_compile_matches_eager(tmp_path: Path, attention: list[str]) -> None:
    settings = ["run.steps=3", "run.log_every=1", "run.eval_batches=1", "model.overrides.dropout=0.0",
                *attention]
    eager = train(load_config("opt-tiny", settings), tmp_path / "eager", progress=False)["losses"]
    compiled = train(load_config("opt-tiny", [*settings, "run.compile=true"]), tmp_path / "compiled", progress=False)
    assert compiled["losses"] == pytest.approx(eager, rel=1e-4)
    # saved without the compile wrapper's "_orig_mod." prefix
    keys = load_file(tmp_path / "compiled" / "model" / "model.safetensors").keys()
    assert keys == load_file(tmp_path / "eager" / "model" / "model.safetensors").keys()
