"""Issue 33: quality vs activation bits per route to W8A8, and each route's largest activation over training
(OUT/routes.json of scripts/routes_table.py).

    python scripts/routes_figure.py docs/results/routes/routes.json docs/results/routes/routes.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quantizable.experiments.display import pyplot


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    routes = json.loads(source.read_text())
    plt = pyplot()
    fig, (ax, over_training) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in routes.items():
        keys = [key for key in ("fp_ppl", "w8a8_ppl", "w8a6_ppl", "w8a4_ppl") if key in row]  # PTQ rows: FP, W8A8
        # FP, A8, A6, A4 as evenly spaced categories; PTQ rows dashed
        ax.plot(range(len(keys)), [row[key] for key in keys], marker="o", linestyle="-" if len(keys) == 4 else "--",
                label=f"{name} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})")
    ax.set_xticks([0, 1, 2, 3], ["FP", "W8A8", "W8A6", "W8A4"])
    ax.set_yscale("log")
    ax.set_xlabel("simulated quantization (static per-tensor ranges)")
    ax.set_ylabel("backcopy perplexity")
    ax.set_title("Routes to W8A8, long Bigram-Backcopy run (8,000 steps)", fontsize=10)
    ax.legend(fontsize=7)
    for name, row in routes.items():  # the largest activation over training, where the reproduction recorded it
        if row.get("curve"):
            points = row["curve"]
            over_training.plot([p["step"] for p in points], [p["max_inf_norm"] for p in points], marker=".",
                               label=name)
    over_training.set_yscale("log")
    over_training.set_xlabel("training step")
    over_training.set_ylabel("max inf-norm of any activation (FP)")
    over_training.set_title("The largest activation over training", fontsize=10)
    over_training.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
