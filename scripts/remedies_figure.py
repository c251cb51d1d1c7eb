"""W8A8 cost over training of gated attention under each remedy (issue 28), beside the plain long run.

    python scripts/remedies_figure.py LONG_RESULTS.json REMEDY_DIR [REMEDY_DIR ...] --out FIGURE.png

LONG_RESULTS.json is ``reproduce --scale long``'s results.json (its vanilla and gated attention rows are drawn as
references); each REMEDY_DIR holds the results.json of ``reproduce --scale long --methods KIND --set ...`` and is
labelled by its kind and folder name (mean over its training seeds). Left: W8A8 cost (% perplexity) per snapshot; right: the largest activation the
trainer logged at that step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantizable.experiments.display import method_name, pyplot


def _curve(row: dict, key: str) -> tuple[list[int], list[float]]:
    points = [p for p in row["curve"] if key in p]
    return [p["step"] for p in points], [p[key]["mean"] for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("long_results", type=Path)
    parser.add_argument("remedies", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    references = [row for row in json.loads(args.long_results.read_text())
                  if row["method"] in ("vanilla", "gated_attention")]
    remedies = [(folder.name, json.loads((folder / "results.json").read_text())[0]) for folder in args.remedies]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, label, scale) in zip(axes, (("W8A8_cost", "W8A8 cost (% perplexity)", "symlog"),
                                              ("max_inf_norm", "max ‖activation‖∞", "log"))):
        for row in references:  # mean over the long run's training seeds, in black / grey
            color = "black" if row["method"] == "gated_attention" else "grey"
            ax.plot(*_curve(row, key), color=color, lw=2.2, ls="--",
                    label=f"{method_name(row['method'])} (plain, {len(row['train_seeds'])} seeds)")
        for index, (name, row) in enumerate(remedies):
            seeds = len(row["train_seeds"])
            ax.plot(*_curve(row, key), color=f"C{index}", marker=".",
                    label=f"{method_name(row['method']).lower()} + {name.removeprefix(row['method'] + '_')} "
                          f"({seeds} seed{'s' if seeds > 1 else ''})")
        ax.set_yscale(scale, **({"linthresh": 1.0} if scale == "symlog" else {}))
        ax.set(xlabel="training step", ylabel=label)
    axes[0].axhline(1.0, color="grey", ls=":", lw=1)  # the bar: within 1% of FP
    axes[0].legend(fontsize=7)
    fig.suptitle("Bigram-Backcopy, 8,000 steps: W8A8 cost and outliers under each remedy")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
