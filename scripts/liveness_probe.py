"""Which clipped-softmax setting keeps attention alive in the CPU presets (issue 27): train variants, compare.

Each variant is the ``full`` reproduction scale of a family's CPU preset (batch 16, T = 128, warm-up 60) cut to
``--steps``, with one attention setting: the paper's gamma with the family init (dead or nearly dead at step 0),
a gamma warm-up, LeCun or nn.Linear-default q/k init, and vanilla with and without LeCun q/k init as the control
that the init alone changes nothing. The trainer logs the alive share (entries above zero, lowest layer) every
``--every`` steps; at the end the script records per layer the alive share, all-zero rows and the gradient norm of
the query weights on one training batch, and the validation loss on 16 batches. Runs in ``--workers`` processes
with one thread each; finished variants are reused.

    python scripts/liveness_probe.py --family bert --steps 300 --out runs/liveness
    python scripts/liveness_probe.py --report runs/liveness --json docs/results/liveness/probe.json \\
        --figure docs/figures/liveness_probe.png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

# name -> attention settings and extra overrides, per family; the paper's setting first
VARIANTS: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "bert": {
        "vanilla": ({"kind": "vanilla"}, ()),
        "vanilla, lecun q/k": ({"kind": "vanilla", "qk_init": "lecun"}, ()),
        "clipped -0.025": ({"kind": "clipped_softmax", "gamma": -0.025}, ()),
        "clipped -0.025, gamma warm-up": ({"kind": "clipped_softmax", "gamma": -0.025}, ("optim.gamma_warmup_steps={half}",)),
        "clipped -0.025, torch_linear q/k": ({"kind": "clipped_softmax", "gamma": -0.025, "qk_init": "torch_linear"}, ()),
        "clipped -0.025, lecun q/k": ({"kind": "clipped_softmax", "gamma": -0.025, "qk_init": "lecun"}, ()),
    },
    "opt": {
        "vanilla": ({"kind": "vanilla"}, ()),
        "vanilla, lecun q/k": ({"kind": "vanilla", "qk_init": "lecun"}, ()),
        "clipped alpha 12 (-0.094)": ({"kind": "clipped_softmax", "alpha": 12}, ()),
        "clipped -12/512": ({"kind": "clipped_softmax", "gamma": -12 / 512}, ()),
        "clipped alpha 12, gamma warm-up": ({"kind": "clipped_softmax", "alpha": 12}, ("optim.gamma_warmup_steps={half}",)),
        "clipped alpha 12, lecun q/k": ({"kind": "clipped_softmax", "alpha": 12, "qk_init": "lecun"}, ()),
        "clipped -12/512, lecun q/k": ({"kind": "clipped_softmax", "gamma": -12 / 512, "qk_init": "lecun"}, ()),
    },
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_variant(family: str, name: str, steps: int, every: int, out: Path) -> dict[str, Any]:
    import torch

    from quantizable import data
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config
    from quantizable.data.tasks import task_data
    from quantizable.evaluation import evaluate
    from quantizable.training import train
    from quantizable.training.config import load_config
    from quantizable.training.monitor import _analyze_one

    torch.set_num_threads(1)
    attention, extra = VARIANTS[family][name]
    overrides = [f"run.steps={steps}", "run.batch_size=16", f"optim.warmup_steps={min(60, steps)}", "run.eval_every=0",
                 "run.checkpoint_every=0", f"run.outlier_every={every}", f"attention={json.dumps(attention)}",
                 *(o.format(half=steps // 2) for o in extra)]
    config = load_config(f"{family}-cpu", overrides)
    run_dir = out / f"{family}-{_slug(name)}"
    result_path = run_dir / "probe.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    started = time.time()
    if not (run_dir / "model" / "config.json").is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train(config, run_dir, progress=False)
    seconds = time.time() - started
    model = load_checked_model(run_dir)
    tokenizer = data.checkpoint_tokenizer(run_dir)
    sets = task_data(config, family_of_config(model.config).task, tokenizer)
    val = next(iter(sets.validation_loader()))
    analysis = _analyze_one(model, val, tokenizer)
    batch = next(iter(data.make_loader(sets.train, 16, sets.collate(0), shuffle=True, seed=0)))
    model.train()
    torch.manual_seed(0)
    model(**batch).loss.backward()
    queries = [p.grad.norm().item() for n, p in model.named_parameters()
               if n.endswith(("query.weight", "q_proj.weight"))]
    model.eval()
    score = evaluate(model, sets.validation_loader(), max_batches=16)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {
        "family": family, "variant": name, "attention": attention, "extra": list(extra), "steps": steps,
        "train_seconds": round(seconds, 1),
        "alive_at_init": log[0].get("alive_share_per_layer") if log and log[0]["step"] == 0 else None,
        "alive_over_training": [[r["step"], r["alive_share"]] for r in log if "alive_share" in r],
        "loss_over_training": [[r["step"], r["loss"]] for r in log if "loss" in r],
        "alive_share_per_layer": analysis.get("alive_share_per_layer"),
        "dead_row_share_per_layer": analysis.get("dead_row_share_per_layer"),
        "dead_layers": analysis.get("dead_layers"),
        "query_grad_norm_per_layer": queries,
        "max_inf_norm": analysis["max_inf_norm"],
        "metric": score["metric"], "value": score["value"],
    }
    result_path.write_text(json.dumps(result, indent=1))
    print(f"{family} {name}: {score['metric']} {score['value']:.2f}, alive {result['alive_share_per_layer']}, "
          f"{seconds:.0f} s", flush=True)
    return result


def report(out: Path, json_path: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/probe.json"))]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    families = sorted({r["family"] for r in results})
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        for r in results:
            if r["family"] != family or not r["alive_over_training"]:
                continue
            steps, alive = zip(*([(0, min(r["alive_at_init"]))] if r["alive_at_init"] else []) + r["alive_over_training"])
            ax.plot(steps, [100 * a for a in alive], marker="o", ms=3,
                    label=f"{r['variant']} ({r['metric']} {r['value']:.0f})")
        ax.set_title(f"{family}-cpu, batch 16: lowest layer's alive entries")
        ax.set_xlabel("step")
        ax.set_ylabel("entries above zero (%)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=90)
    for r in results:
        alive = ", ".join(f"{100 * a:.1f}" for a in r["alive_share_per_layer"] or [])
        init = ", ".join(f"{100 * a:.1f}" for a in r["alive_at_init"] or [])
        print(f"| {r['family']} | {r['variant']} | {init or 'n/a'} | {alive or 'n/a'} | "
              f"{', '.join(f'{g:.2g}' for g in r['query_grad_norm_per_layer'])} | {r['value']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=tuple(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="summarise the probe.json files under this directory")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    if args.report:
        report(args.report, args.json, args.figure)
        return
    jobs = [(family, name, args.steps, args.every, args.out) for family in args.family or VARIANTS
            for name in VARIANTS[family]]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.starmap(run_variant, jobs)


if __name__ == "__main__":
    main()
