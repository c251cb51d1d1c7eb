"""What the attention variants cost in real INT8, from ``benchmarks/bench_int8_variants.py``: per model and setting,
the per-round INT8 latency ratio of clipped softmax and gated attention to vanilla (median, interquartile bar),
with the +-5% band of the issue's target.

    python benchmarks/int8_variants_figure.py [RESULT.json] [OUT.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
VARIANTS = {"clipped_softmax": ("clipped softmax", "tab:orange"), "gated_attention": ("gated attention", "tab:green")}


def main() -> None:
    result = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "int8_variants.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "docs" / "figures" / "int8_variants.png"
    data = json.loads(result.read_text())
    rows = data["rows"]
    models = list(dict.fromkeys(f"{row['family']}-{row['width']}" for row in rows))
    settings = list(rows[0]["latency_ms"])
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 4.2), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        ax.axhspan(0.95, 1.05, color="0.9", zorder=0, label="target: within 5%")
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        for offset, (method, (label, color)) in zip((-0.15, 0.15), VARIANTS.items(), strict=True):
            for index, model in enumerate(models):
                row = next(r for r in rows if f"{r['family']}-{r['width']}" == model and r["method"] == method)
                ratio = row["latency_ms"][setting]["int8_vs_vanilla"]
                ax.errorbar(index + offset, ratio["median"], fmt="o", color=color,
                            yerr=[[ratio["median"] - ratio["q1"]], [ratio["q3"] - ratio["median"]]],
                            capsize=3, label=label if index == 0 else None)
        batch, threads = setting.removeprefix("batch").split("_threads")
        ax.set_title(f"batch {batch} x 128, {threads} thread{'s' if threads != '1' else ''}", fontsize=10)
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=8)
    axes[0][0].set_ylabel("INT8 latency / vanilla INT8 (per round)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    flags = ", ".join(data["machine"].get("cpu_flags", data["machine"].get("flags", []))) or "unknown"
    fig.suptitle(f"ONNX Runtime INT8: what the attention variants cost (CPU flags: {flags}; median, quartiles)",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
