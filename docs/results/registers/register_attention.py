"""Issue 33, ViT registers: how much attention the patch and [CLS] queries put on the register tokens, per layer, in
the runs of run.sh (the 4 evaluation batches of 32 images the reproduction scores on). Usage:
python docs/results/registers/register_attention.py OUT/reg4/runs/*/ > docs/results/registers/register_attention.txt
"""

from __future__ import annotations

import sys

import torch

from quantizable.analysis import recording
from quantizable.data import scoring_data
from quantizable.models import load_model
from quantizable.tasks import Task


@torch.no_grad()
def register_shares(run: str) -> list[float]:
    """Per layer: the mean over heads, images and [CLS] + patch queries of the attention on the registers."""
    model = load_model(run)
    count = model.config.registers
    sums: dict[int, float] = {}
    rows: dict[int, int] = {}

    def record(layer: int, name: str, x: torch.Tensor) -> None:
        if name == "probs":  # (B, H, T, T): the rows of the image tokens, the columns of the registers
            on_registers = x[:, :, :-count, -count:].sum(-1)
            sums[layer] = sums.get(layer, 0.0) + float(on_registers.sum())
            rows[layer] = rows.get(layer, 0) + on_registers.numel()

    data = scoring_data(run, model, Task.IMAGE, batch_size=32, calib_batches=1, eval_batches=4)
    for batch in data.evaluation():
        with recording(model, record, with_attention=True):
            model(pixel_values=batch["pixel_values"])
    return [sums[layer] / rows[layer] for layer in sorted(sums)]


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(run, "attention on the registers per layer:", " ".join(f"{100 * s:.1f}%" for s in register_shares(run)))
