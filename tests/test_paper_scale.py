"""``reproduce --scale paper --dry-run``: the paper's runs and their GPU-hours, without data or network."""

import socket
from pathlib import Path

import pytest

import quantizable.data
from quantizable.cli.main import main
from quantizable.experiments.paper import gpu_hours


def test_paper_dry_run_lists_runs_and_gpu_hours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dry run touched data or the network")

    monkeypatch.setattr(socket, "socket", refuse)
    for name in ("task_data", "load_tokenizer", "make_loader"):
        if hasattr(quantizable.data, name):
            monkeypatch.setattr(quantizable.data, name, refuse)
    assert main(["reproduce", "--scale", "paper", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [line.split()[0] for line in lines[2:-1]]
    assert runs == [f"{preset}-{method}" for preset in ("bert-base", "opt-125m", "vit-s16")
                    for method in ("vanilla", "clipped_softmax", "gated_attention")]
    assert "1,000,000" in lines[2] and "125,000" in lines[5] and "40% MFU" in lines[0]
    assert lines[-1].startswith("total")
    # only the CLI's lock on --out, nothing written
    assert [path.name for path in (tmp_path / "out").iterdir() if not path.name.startswith(".")] == []


def test_gpu_hours_follow_6nd() -> None:
    # 1e8 parameters, 1e9 tokens: 6e17 FLOPs at 40% of 312 TFLOP/s
    assert gpu_hours(1e8, 1e9, "A100") == pytest.approx(6e17 / (0.4 * 312e12) / 3600)
