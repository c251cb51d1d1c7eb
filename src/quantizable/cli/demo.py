"""``quantizable demo``: build each attention variant in every family and show what it changes."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantizable.io import write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for demo.json")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable import AttentionSpec, create_model
    from quantizable.models import FAMILIES
    from quantizable.tasks import Task

    specs = {
        "vanilla": AttentionSpec(),
        "clipped_softmax": AttentionSpec(kind="clipped_softmax", gamma=-0.025),
        "gated_attention": AttentionSpec(kind="gated_attention", gate_type="linear", pi_init=0.25),
    }
    rows = []
    torch.manual_seed(0)
    for preset in (f"{name}-tiny" for name in FAMILIES):  # one tiny preset per family
        for method, spec in specs.items():
            model = create_model(preset, spec).eval()
            if FAMILIES[preset.split("-")[0]].task == Task.IMAGE:
                size = model.config.image_size
                batch = {"pixel_values": torch.randn(2, model.config.num_channels, size, size)}
            else:
                batch = {"input_ids": torch.randint(0, 512, (2, 32))}
            with torch.no_grad():
                logits = model(**batch).logits
            rows.append({"model": preset, "method": method, "spec": spec.describe(),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "logits_shape": list(logits.shape)})
            print(f"{preset:11s} {spec.describe():45s} params={rows[-1]['parameters']:>8,d} logits={tuple(logits.shape)}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "demo.json", rows)
    print(f"wrote {args.out / 'demo.json'}")
    return 0
