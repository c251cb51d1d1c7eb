"""W8A8 quality per model and PTQ baseline from ``benchmarks/ptq_baselines.py`` outputs, one panel per model.

    python benchmarks/ptq_figure.py OUT.png RESULT.json [RESULT.json ...]

A result with ``scores`` (``--embedding-fidelity``) is drawn as the embedding cosine to FP, otherwise as its metric
(perplexity on a log axis); bars are means over calibration seeds, error bars their standard deviation.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _values(entry: dict, cosine: bool) -> list[float]:
    if cosine:
        return [seed["cosine"] for seed in entry["scores"]["per_seed"]]
    return entry["quantized"]["per_seed"]


def main() -> None:
    out, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths):
        result = json.loads(path.read_text())
        cosine = "scores" in result["w8a8"]
        entries = {"W8A8": result["w8a8"], **{name: e for name, e in result["ptq"].items() if "quantized" in e}}
        names = list(entries)
        values = [_values(entries[name], cosine) for name in names]
        ax.bar(names, [statistics.fmean(v) for v in values],
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], color="tab:blue")
        reference = 1.0 if cosine else result["fp"]
        ax.axhline(reference, color="black", linestyle="--", label="FP")
        ax.set_ylabel("cosine of pooled embedding to FP" if cosine else result["metric"])
        if not cosine:
            ax.set_yscale("log")
        ax.set_title(Path(result["model"]).name.split(".")[0] if "gguf" in result["model"] else path.stem)
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle("Simulated W8A8 per PTQ baseline (static per-tensor everywhere else)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
