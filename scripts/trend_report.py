"""Metrics over training of the ``scripts/trend_run.py`` runs: outliers (logged by the trainer) and the no-op
mechanism (``analyze`` on every snapshot), as one JSON file per method and one figure for all methods.

    python scripts/trend_report.py runs/trend --out docs/results/trend --figure docs/figures/trend_bert.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantizable.analysis import analyze
from quantizable.io import write_json_atomic
from quantizable.training.config import TrainConfig
from quantizable.data import task_data
from quantizable.training.trainer import build_model

BATCHES = 2  # fixed validation batches (32 sequences of 128 tokens each) for every snapshot of every method
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
METHOD_NAMES = {"vanilla": "Vanilla", "clipped_softmax": "Clipped softmax", "gated_attention": "Gated attention"}


def _layer_max_of_head_mean(per_head: list[list[float]] | None) -> float | None:
    return None if per_head is None else max(sum(heads) / len(heads) for heads in per_head)


def method_trend(run_dir: Path) -> list[dict[str, float]]:
    """One record per snapshot: step, the trainer's logged outlier metrics and ``analyze``'s mechanism metrics."""
    from safetensors.torch import load_file

    config = TrainConfig.from_run(run_dir)
    model, tokenizer = build_model(config)
    batches = []
    for batch in task_data(config, "mlm", tokenizer).validation_loader():
        batches.append({k: v for k, v in batch.items() if k != "labels"})
        if len(batches) == BATCHES:
            break
    logged = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "max_inf_norm" in record:
            logged[record["step"]] = record
    rows = []
    snapshots = sorted(run_dir.glob("snapshots/step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    for path in snapshots:
        step = int(path.stem.split("_")[1])
        missing = set(model.load_state_dict(load_file(path), strict=False).missing_keys)
        if missing - TIED:
            raise ValueError(f"{path} lacks weights {sorted(missing - TIED)}")
        model.tie_weights()  # the MLM decoder shares the word embeddings, which checkpoints store once
        result = analyze(model, batches, tokenizer=tokenizer)
        rows.append({
            "step": step,
            "max_inf_norm": result["max_inf_norm"], "avg_kurtosis": result["avg_kurtosis"],
            "train_batch_max_inf_norm": logged.get(step, {}).get("max_inf_norm"),
            "train_batch_avg_kurtosis": logged.get(step, {}).get("avg_kurtosis"),
            "sink_share": result["sink_share"],  # [CLS]
            "delimiter_share": max(result["delimiter_share_per_layer"]),
            "sink_or_delimiter_share": _layer_max_of_head_mean(result["sink_or_delimiter_share_per_head"]),
            "dormant_share_with_delimiters": result["dormant_share_with_delimiters"],
            # clipped softmax: attention on no token at all (1 - row sum) and the exact zeros it allows
            "null_share": _layer_max_of_head_mean(result["null_share_per_head"]),
            "clipped_zero_share": _layer_max_of_head_mean(result["clipped_zero_share_per_head"]),
            "alive_share": result["alive_share"],  # the lowest layer's entries above zero (None: no exact zeros)
            "value_drain_min": result["value_drain_min"], "residual_peak": result["residual_peak"],
        })
        print(f"{run_dir.name} step {step}: inf-norm {rows[-1]['max_inf_norm']:.1f} kurtosis "
              f"{rows[-1]['avg_kurtosis']:.1f} sink/delimiter share {rows[-1]['sink_or_delimiter_share']:.3f}",
              flush=True)
    return rows


def plot(trends: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("max_inf_norm", "max ‖block output‖∞", True), ("avg_kurtosis", "avg. kurtosis", True),
              ("sink_or_delimiter_share", "attention on [CLS] + delimiters\n(max layer, mean over heads)", False),
              ("null_share", "attention on no token (1 - row sum)\n(max layer, mean over heads)", False))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for method, rows in trends.items():
        steps = [r["step"] for r in rows]
        for ax, (key, label, log) in zip(axes, panels):
            ax.plot(steps, [r[key] for r in rows], marker=".", label=METHOD_NAMES.get(method, method))
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("Post-LN BERT MLM (bert-cpu: 4 layers, d=128, T=128, batch 32), one thread per method, "
                 "2 fixed validation batches")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the --out of trend_run.py (one directory per method)")
    parser.add_argument("--out", type=Path, required=True, help="directory for <method>.json and the logs")
    parser.add_argument("--figure", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    trends = {}
    for method in METHOD_NAMES:
        run_dir = args.runs / method
        if (run_dir / "config.yaml").is_file():
            trends[method] = method_trend(run_dir)
            write_json_atomic(args.out / f"{method}.json", trends[method])
            (args.out / f"{method}.metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
        elif (args.out / f"{method}.json").is_file():  # measured before: kept in the figure as it was
            trends[method] = json.loads((args.out / f"{method}.json").read_text())
    plot(trends, args.figure)


if __name__ == "__main__":
    main()
