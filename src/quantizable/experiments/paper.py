"""``reproduce --scale paper``: the paper's three pre-training recipes (appendix C) on GPUs, one ``accelerate
launch`` per run over all visible GPUs, each resumable; ``--dry-run`` prints the plan and its GPU-hours.

GPU-hours are estimated, not measured: training FLOPs = 6 * N * tokens (N all parameters, tokens = image patches
+ CLS for ViT), at an assumed model-FLOP utilisation of the GPU's dense bf16 peak."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quantizable.experiments.plan import METHODS, PAPER_ATTENTION

PEAK_BF16 = {"A100": 312e12, "H100 SXM": 989e12}  # dense bf16 FLOP/s
MFU = 0.40  # assumed: typical for 100M-parameter models at these batch sizes with bf16 and torch.compile


@dataclass(frozen=True)
class PaperRecipe:
    """One family's appendix C recipe: the preset holds steps, batch and optimiser; ``data`` the source."""

    family: str
    preset: str
    data: str
    unit: str  # what one sample holds: tokens or images

    def settings(self, method: str) -> list[str]:
        attention = {"kind": method, **PAPER_ATTENTION[self.family].get(method, {})}
        return [f"attention.{key}={value}" for key, value in attention.items()] + [f"data.source={self.data}"]


RECIPES = (
    PaperRecipe("bert", "bert-base", "bookcorpus+wikipedia", "tokens"),
    PaperRecipe("opt", "opt-125m", "bookcorpus+wikipedia", "tokens"),
    PaperRecipe("vit", "vit-s16", "imagenet", "images"),  # an ImageNet-style image folder
)


def recipe_size(recipe: PaperRecipe) -> dict[str, float]:
    """Steps, samples, tokens and parameters of a recipe, from its preset on the meta device (no data read)."""
    import torch

    from quantizable import AttentionSpec, create_model
    from quantizable.training import load_config

    config = load_config(recipe.preset)
    with torch.device("meta"):
        model = create_model(recipe.preset, AttentionSpec())
    samples = config.run.steps * config.run.batch_size * config.optim.grad_accum
    if recipe.unit == "images":
        per_sample = (model.config.image_size // model.config.patch_size) ** 2 + 1
    else:
        per_sample = config.data.seq_len
    return {"steps": config.run.steps, "samples": samples, "tokens": samples * per_sample,
            "params": sum(p.numel() for p in model.parameters())}


def gpu_hours(params: float, tokens: float, gpu: str, mfu: float = MFU) -> float:
    return 6 * params * tokens / (PEAK_BF16[gpu] * mfu) / 3600


def dry_run(methods: tuple[str, ...] = METHODS, families: tuple[str, ...] | None = None) -> str:
    """The plan as text: every run with its steps, samples, tokens and GPU-hours per GPU type."""
    gpus = list(PEAK_BF16)
    lines = [f"scale paper: 6*N*tokens FLOPs at {MFU:.0%} MFU of dense bf16 peak "
             + ", ".join(f"{gpu} {PEAK_BF16[gpu] / 1e12:.0f} TFLOP/s" for gpu in gpus),
             f"{'run':34s} {'steps':>9s} {'samples':>14s} {'tokens':>16s} {'params':>7s} "
             + " ".join(f"{gpu + ' GPU-h':>14s}" for gpu in gpus)]
    total = dict.fromkeys(gpus, 0.0)
    for recipe in RECIPES:
        if families is not None and recipe.family not in families:
            continue
        size = recipe_size(recipe)
        for method in methods:
            hours = {gpu: gpu_hours(size["params"], size["tokens"], gpu) for gpu in gpus}
            total = {gpu: total[gpu] + hours[gpu] for gpu in gpus}
            lines.append(f"{recipe.preset + '-' + method:34s} {size['steps']:9,d} {size['samples']:14,d} "
                         f"{size['tokens']:16,d} {size['params'] / 1e6:6.1f}M "
                         + " ".join(f"{hours[gpu]:14,.0f}" for gpu in gpus) + f"  data {recipe.data}")
    lines.append(f"{'total':34s} {'':>9s} {'':>14s} {'':>16s} {'':>7s} "
                 + " ".join(f"{total[gpu]:14,.0f}" for gpu in gpus))
    return "\n".join(lines)


def launch(out: Path, methods: tuple[str, ...] = METHODS, families: tuple[str, ...] | None = None) -> list[Path]:
    """Train every run with ``accelerate launch`` on all visible GPUs; each continues from its last checkpoint."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0 or shutil.which("accelerate") is None:
        raise RuntimeError("reproduce --scale paper needs CUDA GPUs and the accelerate launcher; see --dry-run")
    runs = []
    for recipe in RECIPES:
        if families is not None and recipe.family not in families:
            continue
        for method in methods:
            run_dir = out / f"{recipe.preset}-{method}"
            command = ["accelerate", "launch", "--num_processes", str(gpus), "--mixed_precision", "bf16",
                       *(["--multi_gpu"] if gpus > 1 else []), "-m", "quantizable.cli.main", "train",
                       "--config", recipe.preset, "--out", str(run_dir), "--resume", "--no-progress",
                       *[arg for setting in recipe.settings(method) for arg in ("--set", setting)]]
            if not (run_dir / "summary.json").is_file():
                print(" ".join(command), flush=True, file=sys.stderr)
                subprocess.run(command, check=True)
            runs.append(run_dir)
    return runs
