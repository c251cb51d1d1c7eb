"""How much of clipped softmax's attention is alive at initialisation, for the paper's settings and our CPU presets.

An entry is alive when its clipped probability is above zero (its softmax probability above -gamma/(zeta-gamma));
only alive entries pass gradient to q and k. Whether a freshly initialised model has any depends on the spread of
its initial scores, which is about d_model * std(W_q) * std(W_k) for LayerNorm'd inputs. For each setting this
builds the model exactly as ``quantizable train`` does (training preset, attention spec, each q/k init), runs one
batch of the preset's own data (the embedded corpus; N(0, 1) noise images at ViT-S/16's 224x224, where ImageNet is
not on the machine) in eval mode for two seeds, and records per layer the score spread (std over a row's keys,
mean over rows), the alive share of entries and the share of all-zero rows. Takes about two minutes on 2 cores.

    python scripts/alive_at_init.py --json docs/results/liveness/alive_at_init.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

# (label, training preset, attention spec, extra overrides); the paper's three settings first (BERT table 5,
# OPT table 6: alpha 12 at T = 512, ViT table 7 with the patch LayerNorm), then ours
SETTINGS: tuple[tuple[str, str, dict[str, Any], tuple[str, ...]], ...] = (
    ("BERT-base, gamma -0.025 (T 128)", "bert-base", {"gamma": -0.025}, ()),
    ("OPT-125m, alpha 12 (T 512: gamma -0.0234)", "opt-125m", {"alpha": 12}, ()),
    ("ViT-S/16, gamma -0.0001 (197 tokens)", "vit-s16", {"gamma": -0.0001}, ()),
    ("bert-cpu, gamma -0.025 (T 128)", "bert-cpu", {"gamma": -0.025}, ()),
    ("opt-cpu, alpha 12 (T 128: gamma -0.094)", "opt-cpu", {"alpha": 12}, ()),
    ("opt-cpu, gamma -12/512", "opt-cpu", {"gamma": -12 / 512}, ()),
    ("vit-cpu, gamma -0.003 (50 tokens)", "vit-cpu", {"gamma": -0.003}, ()),
    ("backcopy, alpha 4 (T 64: gamma -0.0625)", "opt-backcopy", {"alpha": 4}, ()),
)
INITS = ("family", "torch_linear", "lecun")
BATCH = 8


def _batch(config: Any, model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    from quantizable import data
    from quantizable.data.tasks import task_data
    from quantizable.models import family_of_config
    from quantizable.tasks import Task

    task = family_of_config(model.config).task
    if task == Task.IMAGE and model.config.image_size == 224:
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(BATCH, model.config.num_channels, 224, 224, generator=g)}, None
    tokenizer = None if task == Task.IMAGE else data.source_tokenizer(
        config.data.source, config.data.tokenizer or data.DEFAULT_TOKENIZER[task])
    batch = next(iter(task_data(config, task, tokenizer).validation_loader()))
    return {k: v[:BATCH] for k, v in batch.items() if k != "labels"}, tokenizer


def measure(label: str, preset: str, attention: dict[str, Any], extra: tuple[str, ...], init: str,
            seed: int) -> dict[str, Any]:
    from quantizable.analysis import analyze
    from quantizable.models.modeling import attention_modules
    from quantizable.training.config import load_config
    from quantizable.training.trainer import build_model

    spec = {"kind": "clipped_softmax", **attention, "qk_init": init}
    config = load_config(preset, [f"attention={json.dumps(spec)}", f"run.batch_size={BATCH}", *extra])
    torch.manual_seed(seed)
    model, _ = build_model(config)
    batch, tokenizer = _batch(config, model)
    spreads: list[list[float]] = []

    def tap(scores: torch.Tensor) -> torch.Tensor:
        spreads[-1].append(float(scores.float().std(dim=-1).mean()))
        return scores

    for module in attention_modules(model):
        module.attention_taps = {"scores": tap}
    spreads.append([])
    with torch.no_grad():
        model.eval()(**batch)
    for module in attention_modules(model):
        del module.attention_taps
    result = analyze(model, [batch], tokenizer=tokenizer)
    threshold = model.attention_spec.clip_threshold()
    return {"setting": label, "preset": preset, "qk_init": init, "seed": seed, "threshold": threshold,
            "d_model": model.config.hidden_size, "score_spread_per_layer": spreads[-1],
            "alive_share_per_layer": result["alive_share_per_layer"],
            "dead_row_share_per_layer": result["dead_row_share_per_layer"], "dead_layers": result["dead_layers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for label, preset, attention, extra in SETTINGS:
        for init in INITS:
            runs = [measure(label, preset, attention, extra, init, seed) for seed in range(args.seeds)]
            mean = {key: [statistics.fmean(v) for v in zip(*(r[key] for r in runs))]
                    for key in ("score_spread_per_layer", "alive_share_per_layer", "dead_row_share_per_layer")}
            rows.append({**{k: runs[0][k] for k in ("setting", "preset", "qk_init", "threshold", "d_model")},
                         **mean, "seeds": args.seeds})
            a, d, s = mean["alive_share_per_layer"], mean["dead_row_share_per_layer"], mean["score_spread_per_layer"]
            print(f"| {label} | {init} | {s[0]:.3g} | {a[0]:.2e} | {100 * d[0]:.1f}% | {a[-1]:.2e} | "
                  f"{100 * d[-1]:.1f}% |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
