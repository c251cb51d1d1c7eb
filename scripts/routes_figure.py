"""Issue 33: quality vs activation bits per route to W8A8 (OUT/routes.json of scripts/routes_table.py).

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
    fig, ax = plt.subplots(figsize=(6, 3.6))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
