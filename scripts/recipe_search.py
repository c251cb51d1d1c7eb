"""The recipe search of docs/recipe-search.md: which small CPU training grows outliers in vanilla attention?

    python scripts/recipe_search.py list                 # the probes and their exact training settings
    python scripts/recipe_search.py run NAME [NAME ...]  # train (1 thread) + W8A8 into runs/search/NAME, log to docs
    python scripts/recipe_search.py table                # markdown table + docs/figures/recipe_search.png

Each probe is one `quantizable train` run (vanilla attention unless its settings say otherwise) with the outlier
metrics logged every 100 steps; `run` then measures simulated W8A8 with `quantizable quantize` (8 calibration
batches x 2 seeds, 8 validation batches) and keeps the two small result files under docs/recipe-search/ as the
evidence behind the table. Trios over the three methods use `quantizable reproduce --set ...` instead (see the doc).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = ROOT / "docs" / "recipe-search"
NO_DROPOUT = {"bert": ["model.overrides.hidden_dropout_prob=0.0", "model.overrides.attention_probs_dropout_prob=0.0"],
              "opt": ["model.overrides.dropout=0.0"]}
HOT_OPT = ["optim.lr=1e-2", "optim.weight_decay=0", "run.batch_size=16", "optim.warmup_steps=60", *NO_DROPOUT["opt"]]

# name -> (preset, overrides, what it tests)
PROBES: dict[str, tuple[str, list[str], str]] = {
    "opt-hot-constant": ("opt-cpu", [*HOT_OPT, "optim.final_lr_fraction=1.0", "run.steps=600"],
                         "pre-LN CLM, lr 1e-2 held constant, no weight decay/dropout"),
    "opt-hot-12-layers": ("opt-cpu", ["run.steps=600", "run.batch_size=16", "optim.warmup_steps=60",
                                      "model.overrides.num_hidden_layers=12"],
                          "the opt-cpu recipe (lr 1e-2, linear decay) with 12 layers: more layers than the data needs"),
    "bert-no-dropout": ("bert-cpu", [*NO_DROPOUT["bert"], "run.steps=1000", "run.batch_size=16",
                                     "optim.warmup_steps=100", "run.eval_every=200", "run.eval_batches=8"], "post-LN MLM with [CLS]/[SEP], paper-like lr 1e-3"),
    "vit-hot": ("vit-cpu", ["optim.lr=3e-3", "optim.weight_decay=0", "run.steps=800", "optim.warmup_steps=80",
                         "run.eval_every=200"],
                "ViT on Fashion-MNIST (much background), lr 3e-3, no weight decay"),
    "vit-hot-16-heads": ("vit-cpu", ["optim.lr=3e-3", "optim.weight_decay=0", "run.steps=1200",
                                     "optim.warmup_steps=100", "model.overrides.num_attention_heads=16",
                                     "run.eval_every=400"],
                         "as vit-hot with 16 heads of 8 dims: more heads than the task needs"),
}


def _quantizable(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "quantizable.cli.main", *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def run(name: str) -> None:
    preset, overrides, _ = PROBES[name]
    out = ROOT / "runs" / "search" / name
    settings = [arg for o in [*overrides, "run.outlier_every=100", "run.checkpoint_every=200"] for arg in ("--set", o)]
    if not (out / "model" / "config.json").is_file():
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        _quantizable("train", "--config", preset, *settings, "--no-progress", "--out", str(out), *resume)
    if not (out / "w8a8" / "results.json").is_file():
        _quantizable("quantize", str(out), "--calib-batches", "8", "--seeds", "2", "--eval-batches", "8",
                     "--batch-size", "16", "--out", str(out / "w8a8"))
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "metrics.jsonl", EVIDENCE / f"{name}.metrics.jsonl")
    shutil.copyfile(out / "w8a8" / "results.json", EVIDENCE / f"{name}.w8a8.json")


def _curve(name: str) -> list[dict]:
    rows = [json.loads(line) for line in (EVIDENCE / f"{name}.metrics.jsonl").read_text().splitlines() if line]
    return [row for row in rows if "max_inf_norm" in row]


def table() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| probe | setting | steps | max inf-norm (end / peak) | avg kurtosis (end) | FP | W8A8 | W8A8 loss |",
             "|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, (preset, _, what) in PROBES.items():
        if not (EVIDENCE / f"{name}.metrics.jsonl").is_file():
            continue
        curve = _curve(name)
        w8a8 = json.loads((EVIDENCE / f"{name}.w8a8.json").read_text())
        fp, q = w8a8["fp"], w8a8["quantized"]["mean"]
        loss = f"{100 * (q - fp) / fp:+.2f}%" if w8a8["metric"] == "perplexity" else f"{fp - q:+.2f} pts"
        end = curve[-1]
        lines.append(f"| `{name}` | {what} ({preset}) | {end['step']} | {end['max_inf_norm']:.1f} / "
                     f"{max(r['max_inf_norm'] for r in curve):.1f} | {end['avg_kurtosis']:.1f} | {fp:.2f} | "
                     f"{q:.2f} | {loss} |")
        steps = [r["step"] for r in curve]
        axes[0].plot(steps, [r["max_inf_norm"] for r in curve], marker=".", label=name)
        axes[1].plot(steps, [r["avg_kurtosis"] for r in curve], marker=".", label=name)
    for ax, label in zip(axes, ("max ‖block output‖∞", "avg. kurtosis (Gaussian = 3)")):
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Recipe search: vanilla outlier metrics during training (fixed validation batch)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "figures" / "recipe_search.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["list"]:
        for name, (preset, overrides, what) in PROBES.items():
            print(f"{name}: {what}\n    quantizable train --config {preset} " + " ".join(f"--set '{o}'" for o in overrides))
    elif argv[:1] == ["run"] and argv[1:]:
        unknown = [n for n in argv[1:] if n not in PROBES]
        if unknown:
            print(f"error: unknown probes {unknown}; known: {', '.join(PROBES)}", file=sys.stderr)
            return 2
        for name in argv[1:]:
            run(name)
    elif argv[:1] == ["table"]:
        print(table())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
