"""Issue 33: one table of every route to W8A8 from the runs of ``scripts/routes_run.sh``.

usage: python scripts/routes_table.py OUT [--scale long]

Each route but QAT is a ``reproduce`` output (``OUT/<dir>/runs/backcopy-opt-<kind>-seed<N>-*``, measured there);
the QAT fine-tunes (``OUT/qat/seed<N>``) are measured here with the reproduction's own ``measure`` (same calibration
and evaluation batches, same seeds), so every number comes from the same code. Train-step time is the run's
``train_seconds / step`` (the QAT row: its fine-tune steps, quantizers in the forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# route -> (reproduce directory, attention kind); QAT has its own layout
ROUTES = {"vanilla": ("kinds", "vanilla"), "gated attention": ("kinds", "gated_attention"),
          "sink logit": ("kinds", "sink_logit"), "Muon": ("muon", "vanilla"),
          "Muon + single-scale norm": ("muon-ss", "vanilla"),
          "OSP (Muon + single-scale + emb. proj.)": ("osp", "vanilla"), "QAT W8A8 of vanilla": ("qat", None)}


def _qat_measure(run_dir: Path, scale_name: str) -> dict[str, Any]:
    from quantizable.experiments.measure import load_run, measure
    from quantizable.experiments.plan import SCALES

    path = run_dir / "measure.json"
    if not path.is_file():
        scale = SCALES[scale_name]
        path.write_text(json.dumps(measure(load_run(run_dir, scale), run_dir, scale).to_dict(), indent=1))
    return json.loads(path.read_text())


def _runs(out: Path, directory: str, kind: str | None, scale: str) -> list[tuple[dict, dict]]:
    """(measure.json, summary.json) of each seed of one route."""
    if kind is None:
        dirs = sorted((out / directory).glob("seed*"))
        return [(_qat_measure(d, scale), json.loads((d / "summary.json").read_text())) for d in dirs]
    dirs = sorted((out / directory / "runs").glob(f"backcopy-opt-{kind}-seed*"))
    return [(json.loads((d / "measure.json").read_text()), json.loads((d / "summary.json").read_text()))
            for d in dirs if (d / "measure.json").is_file()]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def row(runs: list[tuple[dict, dict]]) -> dict[str, float]:
    sweep = lambda name: _mean([statistics.fmean(m["bits_sweep"][name]) for m, _ in runs])  # noqa: E731
    fp = _mean([m["fp"] for m, _ in runs])
    return {"seeds": len(runs), "fp_ppl": fp, "w8a8_ppl": sweep("W8A8"), "w8a6_ppl": sweep("W8A6"),
            "w8a4_ppl": sweep("W8A4"), "w8a8_cost_pct": 100 * (sweep("W8A8") / fp - 1),
            "w8a4_cost_pct": 100 * (sweep("W8A4") / fp - 1),
            "max_inf_norm": _mean([m["max_inf_norm"] for m, _ in runs]),
            "avg_kurtosis": _mean([m["avg_kurtosis"] for m, _ in runs]),
            "ms_per_step": _mean([1000 * s["train_seconds"] / s["step"] for _, s in runs if s.get("step")])}


def curve(out: Path, directory: str, kind: str) -> list[dict[str, float]] | None:
    """The route's snapshots over training (the reproduction's results.json, mean over seeds): step, max inf-norm
    and the W8A8 / W8A4 perplexity cost in percent."""
    path = out / directory / "results.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text()) if r.get("method") == kind and r.get("curve")]
    return [{"step": point["step"], "max_inf_norm": point["max_inf_norm"]["mean"],
             "w8a8_cost_pct": point["W8A8_cost"]["mean"], "w8a4_cost_pct": point["W8A4_cost"]["mean"]}
            for point in rows[0]["curve"]] if rows else None


def best_ptq(out: Path, kind: str) -> tuple[str, dict[str, float]] | None:
    """The PTQ baseline (``reproduce --ptq``, the run's ptq.json) with the lowest mean W8A8 perplexity over the
    seeds of one kinds route, as a row with only FP and W8A8 (PTQ is measured at W8A8)."""
    files = sorted((out / "kinds" / "runs").glob(f"backcopy-opt-{kind}-seed*/ptq.json"))
    per_method: dict[str, list[tuple[float, float]]] = {}
    for path in files:
        for name, result in json.loads(path.read_text()).items():
            if "quantized" in result:
                per_method.setdefault(name, []).append((result["fp"], result["quantized"]["mean"]))
    scored = {name: pairs for name, pairs in per_method.items() if len(pairs) == len(files)}
    if not scored:
        return None
    name, pairs = min(scored.items(), key=lambda item: _mean([q for _, q in item[1]]))
    fp, w8a8 = _mean([f for f, _ in pairs]), _mean([q for _, q in pairs])
    return name, {"seeds": len(pairs), "fp_ppl": fp, "w8a8_ppl": w8a8, "w8a8_cost_pct": 100 * (w8a8 / fp - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", default="long")
    args = parser.parse_args()
    rows = {name: row(runs) for name, (d, kind) in ROUTES.items() if (runs := _runs(args.out, d, kind, args.scale))}
    for name, (directory, kind) in ROUTES.items():
        if name in rows and kind is not None and (points := curve(args.out, directory, kind)):
            rows[name]["curve"] = points
    for route, kind in (("vanilla", "vanilla"), ("gated attention", "gated_attention")):
        if (best := best_ptq(args.out, kind)) is not None:
            rows[f"{route} + best PTQ ({best[0]})"] = best[1]
    (args.out / "routes.json").write_text(json.dumps(rows, indent=1))
    lines = ["| route | seeds | FP ppl | W8A8 ppl (cost) | W8A6 ppl | W8A4 ppl (cost) | max inf-norm | avg kurtosis | "
             "train step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "w8a4_ppl" not in r:  # a PTQ row: W8A8 only
            lines.append(f"| {name} | {r['seeds']} | {r['fp_ppl']:.3f} | {r['w8a8_ppl']:.3f} ({r['w8a8_cost_pct']:+.2f}%) "
                         "| - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {r['seeds']} | {r['fp_ppl']:.3f} | {r['w8a8_ppl']:.3f} ({r['w8a8_cost_pct']:+.2f}%) | "
                     f"{r['w8a6_ppl']:.3f} | {r['w8a4_ppl']:.3f} ({r['w8a4_cost_pct']:+.1f}%) | "
                     f"{r['max_inf_norm']:.1f} | {r['avg_kurtosis']:.2f} | {r['ms_per_step']:.1f} ms |")
    (args.out / "routes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
