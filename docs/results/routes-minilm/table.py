"""Issue 33's routes to W8A8 on MiniLM-L6: one table from the runs of ``scripts/finetune-demo.sh routes``.

usage: python docs/results/routes-minilm/table.py RUNS [DEST]   (RUNS: the script's OUT, by default runs/finetune/routes;
DEST: where routes.md / routes.json and each route's small result files go, by default this folder)

Every number is read from the script's own outputs: ``quantize`` results.json (W8A8 / W8A6 / W8A4, PTQ), ``analyze``
metrics.json (outliers) and the run's summary.json (train time). Routes without outputs are left out.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROUTES = {"base": "MiniLM-L6 as released", "vanilla": "vanilla fine-tune", "gated": "gated attention (pi_init 0.9, gate lr x100)",
          "sink_logit": "sink logit"}
PTQ = {"per_token": "per-token activation ranges (dynamic)", "smoothquant": "SmoothQuant",
       "outlier_fp": "outlier channels in FP", "rotation": "rotation"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _route_name(name: str) -> str:
    if name.startswith("muon-lr"):
        return f"Muon (lr {name.removeprefix('muon-lr')})"
    if name == "qat":
        return "QAT W8A8 of vanilla (40 steps)"
    return ROUTES.get(name, name)


def main(runs: Path, dest: Path) -> None:
    measure = runs / "measure"
    names = ["base", "vanilla", "gated", "sink_logit"] + sorted(p.name for p in measure.glob("muon-lr*")) + ["qat"]
    rows = []
    for name in names:
        m = measure / name
        analysis = _load(m / "analysis" / "metrics.json")
        bits = {b: _load(m / b / "results.json") for b in ("w8a8", "w8a6", "w8a4")}
        if analysis is None and bits["w8a8"] is None:
            continue
        summary = _load(runs / name / "summary.json")
        fp = bits["w8a8"]["fp"] if bits["w8a8"] else None
        row = {"route": _route_name(name), "dir": name, "fp_ppl": fp,
               **{f"{b}_ppl": (r["quantized"]["mean"] if r else None) for b, r in bits.items()},
               **{f"{b}_std": (r["quantized"]["std"] if r else None) for b, r in bits.items()},
               "max_ffn_out_inf_norm": analysis and analysis["max_ffn_out_inf_norm"],
               "max_attn_out_inf_norm": analysis and analysis["max_attn_out_inf_norm"],
               "block_out_inf_norm": analysis and analysis["max_inf_norm"],
               "avg_kurtosis": analysis and analysis["avg_kurtosis"],
               "paper_avg_kurtosis": analysis and analysis["paper_metrics"]["avg_kurtosis"],
               "train_s": summary and summary["train_seconds"], "steps": summary and summary["step"],
               "eval_ppl_train_end": summary and summary["eval"]["value"]}
        rows.append(row)
        for sub in ("analysis/metrics.json", "analysis/report.md", "w8a8/results.json", "w8a6/results.json",
                    "w8a4/results.json"):
            if (m / sub).is_file():
                (dest / name / sub).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(m / sub, dest / name / sub)
        for sub in ("summary.json", "config.yaml"):
            if (runs / name / sub).is_file():
                shutil.copyfile(runs / name / sub, dest / name / sub)
    ptq_rows = []
    for key, label in PTQ.items():
        r = _load(measure / f"ptq-{key}" / "w8a8" / "results.json")
        if r is None:
            continue
        (dest / f"ptq-{key}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(measure / f"ptq-{key}" / "w8a8" / "results.json", dest / f"ptq-{key}" / "results.json")
        ptq_rows.append({"route": f"vanilla + {label} (`{r['ptq']['ptq']['name']}`)", "ptq": key, "fp_ppl": r["fp"],
                         "w8a8_ppl": r["ptq"]["quantized"]["mean"], "w8a8_std": r["ptq"]["quantized"]["std"]})
    (dest / "routes.json").write_text(json.dumps({"routes": rows, "ptq": ptq_rows}, indent=1))

    def f(x, fmt="{:,.1f}"):
        return "-" if x is None else fmt.format(x)

    def cost(q, fp):
        if q is None or fp is None:
            return "-"
        pct = 100 * (q / fp - 1)
        return f"{f(q, '{:,.0f}' if q >= 1000 else '{:,.1f}')} ({pct:+,.0f}%)" if abs(pct) >= 100 else f"{f(q)} ({pct:+.1f}%)"

    lines = ["| route | FP ppl | W8A8 ppl (cost) | W8A6 ppl (cost) | W8A4 ppl (cost) | max FFN-out inf-norm | "
             "max attn-out inf-norm | block-out inf-norm / avg kurtosis | paper avg kurtosis | train s / step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_step = None if not r["train_s"] else r["train_s"] / r["steps"]
        lines.append(f"| {r['route']} | {f(r['fp_ppl'])} | {cost(r['w8a8_ppl'], r['fp_ppl'])} | "
                     f"{cost(r['w8a6_ppl'], r['fp_ppl'])} | {cost(r['w8a4_ppl'], r['fp_ppl'])} | "
                     f"{f(r['max_ffn_out_inf_norm'])} | {f(r['max_attn_out_inf_norm'], '{:.2f}')} | "
                     f"{f(r['block_out_inf_norm'], '{:.2f}')} / {f(r['avg_kurtosis'])} | "
                     f"{f(r['paper_avg_kurtosis'], '{:,.0f}')} | {f(per_step, '{:.2f}')} |")
    for r in ptq_rows:
        lines.append(f"| {r['route']} | {f(r['fp_ppl'])} | {cost(r['w8a8_ppl'], r['fp_ppl'])} | - | - | - | - | - | - | - |")
    (dest / "routes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
