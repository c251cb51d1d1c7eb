"""FP32 vs INT8 latency in ONNX Runtime, per model size (random weights and inputs: the cost does not depend on them).

For each preset: export to ONNX (reference attention), quantize statically (QDQ, per-tensor) on a few random
batches, then time both sessions on the same batch with the same thread count, interleaved so that load from other
processes hits both alike; the median is reported with the ratio. Quality is measured by ``quantizable export``.

    python benchmarks/bench_int8.py [--presets opt-tiny opt-small] [--batch-size 8] [--seq-len 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from quantizable.attention.spec import spec_for_method
from quantizable.export import export_onnx, median_latencies_ms, quantize_onnx, session
from quantizable.models import MODEL_PRESETS, create_model


def _batch(model, family: str, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        size, channels = model.config.image_size, model.config.num_channels
        return {"pixel_values": torch.randn(batch_size, channels, size, size, generator=g)}
    ids = torch.randint(model.config.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench(preset: str, method: str, batch_size: int, seq_len: int, threads: int, repeats: int) -> dict:
    family = MODEL_PRESETS[preset][0]
    model = create_model(preset, spec_for_method(method)).eval()
    batch = _batch(model, family, batch_size, seq_len, seed=0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = export_onnx(model, batch, Path(tmp) / "fp32.onnx")
        calibration = [_batch(model, family, batch_size, seq_len, seed=s) for s in range(1, 5)]
        int8 = quantize_onnx(fp32, Path(tmp) / "int8.onnx", calibration)
        sizes = {"fp32_mb": fp32.stat().st_size / 2**20, "int8_mb": int8.stat().st_size / 2**20}
        latency = median_latencies_ms({"fp32": session(fp32, threads), "int8": session(int8, threads)}, batch,
                                      repeats=repeats)
    return {"preset": preset, "method": method, "batch": {k: list(v.shape) for k, v in batch.items()},
            "threads": threads, **{f"{k}_ms": v for k, v in latency.items()},
            "speedup": latency["fp32"] / latency["int8"], **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["opt-tiny", "opt-small", "bert-small", "vit-small"])
    parser.add_argument("--method", default="clipped_softmax")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for preset in args.presets:
        row = bench(preset, args.method, args.batch_size, args.seq_len, args.threads, args.repeats)
        print(f"{preset:12s} FP32 {row['fp32_ms']:8.2f} ms  INT8 {row['int8_ms']:8.2f} ms  "
              f"speedup {row['speedup']:.2f}x  size {row['fp32_mb']:.2f} -> {row['int8_mb']:.2f} MiB")
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
