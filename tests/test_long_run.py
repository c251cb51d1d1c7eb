"""The long study's machinery (issue 28): weight snapshots during training, every snapshot quantized, curves
aggregated over seeds, the report's section, and an interrupted measurement continuing where it stopped."""

import importlib
import json
from pathlib import Path

import pytest
import torch

from quantizable.experiments import curves
from quantizable.experiments.plan import LONG_METHODS, SCALES, run_config
from quantizable.experiments.reproduce import reproduce
from quantizable.integrity import load_checked_model
from quantizable.training import load_config, train
from quantizable.training.artifacts import snapshots


def test_snapshots_hold_the_weights_of_their_step(tmp_path: Path) -> None:
    config = load_config("opt-tiny", ["run.steps=4", "run.snapshot_every=2", "run.log_every=1"])
    train(config, tmp_path, progress=False)
    assert [step for step, _ in snapshots(tmp_path)] == [2, 4]
    last = load_checked_model(snapshots(tmp_path)[-1][1]).state_dict()
    final = load_checked_model(tmp_path).state_dict()
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    first = load_checked_model(snapshots(tmp_path)[0][1]).state_dict()
    assert any(not torch.equal(first[k], final[k]) for k in final)  # two more steps changed the weights


def test_curve_cost_is_the_relative_perplexity_increase() -> None:
    def point(step: int, fp: float, w8a8: float, norm: float) -> dict:
        return {"step": step, "metric": "perplexity", "fp": fp, "W8A8": w8a8, "W8A6": fp, "W8A4": 2 * fp,
                "max_inf_norm": norm}

    seed0 = [point(10, 4.0, 5.0, 100.0), point(20, 3.0, 3.3, 300.0)]
    seed1 = [point(10, 4.0, 4.0, 200.0), point(20, 3.0, 6.0, 500.0), point(30, 2.0, 2.0, 1.0)]
    rows = curves.aggregate_curve([seed0, seed1])
    assert [row["step"] for row in rows] == [10, 20]  # only the steps every seed reached
    assert rows[0]["W8A8_cost"]["per_seed"] == pytest.approx([25.0, 0.0])
    assert rows[1]["W8A8_cost"]["mean"] == pytest.approx((10.0 + 100.0) / 2)
    assert rows[1]["W8A4_cost"]["mean"] == pytest.approx(100.0)
    assert rows[1]["max_inf_norm"]["mean"] == pytest.approx(400.0)


def test_user_overrides_refine_the_method() -> None:
    config = run_config("opt", "gated_attention", 0, SCALES["long"], ("attention.pi_init=0.5",), "backcopy")
    assert config.attention.kind == "gated_attention" and config.attention.pi_init == 0.5
    assert config.run.snapshot_every and config.optim.final_lr_fraction == 1.0


def test_long_scale_plans_its_task_and_kinds(tmp_path: Path, monkeypatch) -> None:
    planned = []

    def capture(jobs, workers, progress, started):
        planned.extend(jobs)
        raise KeyboardInterrupt

    # the package exports the function under the module's name
    monkeypatch.setattr(importlib.import_module("quantizable.experiments.reproduce"), "_run_all", capture)
    with pytest.raises(KeyboardInterrupt):
        reproduce(tmp_path, "long", methods=None, tasks=None, progress=False)
    assert {job.task for job in planned} == {"backcopy"}
    assert [job.method for job in planned[::2]] == list(LONG_METHODS) and {job.seed for job in planned} == {0, 1}
    with pytest.raises(ValueError, match="task pretrain has no scale 'long'.*trains: backcopy"):
        reproduce(tmp_path, "long", tasks=("pretrain",), progress=False)


@pytest.mark.slow
def test_long_tiny_curves_report_and_resume(tmp_path: Path, capsys) -> None:
    rows = reproduce(tmp_path, "long-tiny", methods=("vanilla", "gated_attention"), tasks=("backcopy",),
                     progress=False)
    assert [row["method"] for row in rows] == ["vanilla", "gated_attention"]
    for row in rows:
        assert [point["step"] for point in row["curve"]] == [6, 12]
        for run_dir in map(Path, row["runs"]):
            cached = json.loads((run_dir / "curve" / "step_12.json").read_text())
            # the last snapshot is the final model: its FP score is the one the final measurement found
            final = json.loads((run_dir / "measure.json").read_text())
            assert cached["fp"] == pytest.approx(final["fp"], rel=1e-6)
        last = row["curve"][-1]
        assert last["max_inf_norm"]["mean"] > 0 and "copy_accuracy_W8A8" in last
    report = (tmp_path / "report.md").read_text()
    assert "quantization cost over training" in report and (tmp_path / "curves_backcopy_opt.png").is_file()

    # an interrupted measurement: one point missing is measured again, the others are read back
    run_dir = Path(rows[1]["runs"][0])
    kept = (run_dir / "curve" / "step_6.json").stat().st_mtime_ns
    (run_dir / "curve" / "step_12.json").unlink()
    capsys.readouterr()
    again = reproduce(tmp_path, "long-tiny", methods=("gated_attention",), tasks=("backcopy",), progress=False)
    out = capsys.readouterr().out
    assert out.count("measuring the snapshot") == 1 and "step 12" in out
    assert (run_dir / "curve" / "step_6.json").stat().st_mtime_ns == kept
    assert again[0]["curve"][-1]["fp"]["mean"] == pytest.approx(rows[1]["curve"][-1]["fp"]["mean"])
