"""``quantizable analyze MODEL_OR_RUN --out DIR``: outlier metrics, their localisation and the paper's figures.

MODEL_OR_RUN is one of our run directories (``model/`` + ``config.yaml``), a Hugging Face BERT/OPT/ViT/Llama
checkpoint directory or a ``.gguf`` file. Text comes from ``--data FILE`` (tokenized with the model's own
tokenizer) or, by default, the embedded validation split of ``quantizable.data``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from quantizable.cli.errors import UserError
from quantizable.tasks import Task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL_OR_RUN",
                        help="run directory, Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("--data", type=Path, default=None,
                        help="UTF-8 text file (gzip too) or a folder of .txt / .txt.gz files to evaluate on (default: the "
                             "embedded validation split)")
    parser.add_argument("--batches", type=int, default=4, help="number of batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the run's data.seq_len, else 128)")
    parser.add_argument("--layer", type=int, default=None,
                        help="zero-based layer for the attention figures (default: the layer with most outliers)")
    parser.add_argument("--head", type=int, default=None,
                        help="zero-based head for the attention figures (default: the head of the top outlier dim)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for metrics.json, report.md, PNGs")


def _default_batches(tokenizer, seq_len: int, task: str, batch_size: int, n_batches: int,
                     source: str | None, model_config) -> Iterable:
    """The validation split of the run's data source, or of the embedded default corpus / Fashion-MNIST."""
    from quantizable.data import image_dataset, make_loader, text_dataset

    if task == Task.IMAGE:
        return make_loader(image_dataset("validation", source=source, config=model_config), batch_size)
    if tokenizer is None:
        raise UserError("no tokenizer for this model: no tokenizer files next to it and no data.tokenizer in config.yaml")
    max_tokens = 2 * n_batches * batch_size * seq_len  # tokenize only what is analysed
    return make_loader(text_dataset("validation", tokenizer, seq_len, task, source=source, max_tokens=max_tokens),
                       batch_size)


def run(args: argparse.Namespace) -> int:
    import torch

    from quantizable.analysis import analyze
    from quantizable.data import model_tokenizer, resolve_seq_len, run_data_settings, text_batches
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config

    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.data is not None and not args.data.exists():
        raise UserError(f"--data {args.data}: no such text file or directory")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    settings = run_data_settings(args.model)
    # outliers and the no-op mechanism live in the hidden states: a base encoder without its task head is analysed
    model = load_checked_model(args.model, new_weights=True)
    task = family_of_config(model.config).task
    seq_len = resolve_seq_len(args.seq_len, model, task, settings.get("seq_len"))
    tokenizer = None if task == Task.IMAGE else model_tokenizer(args.model)
    if args.data is not None:
        if tokenizer is None:
            raise UserError(f"{args.model} has no tokenizer to read --data with (image model or no tokenizer files)")
        batches = text_batches(args.data, tokenizer, seq_len, args.batch_size, args.batches)
    else:
        loader = _default_batches(tokenizer, seq_len, task, args.batch_size, args.batches, settings.get("source"),
                                  model.config)
        batches = islice(loader, args.batches)
    result = analyze(model, batches, tokenizer=tokenizer, out_dir=args.out, layer=args.layer, head=args.head)
    share = result["outliers"]["delimiter_share"]
    inputs = "images" if task == Task.IMAGE else "sequences"
    asked = args.batches * args.batch_size
    if args.data is not None and result["sequences"] < asked:  # a short file, or one long line cut at --seq-len
        print(f"note: {args.data} fills {result['sequences']} of the {asked} sequences asked for (paragraphs are "
              f"packed into sequences of up to {seq_len} tokens and a longer paragraph is cut to one sequence); "
              f"give more text or blank lines between paragraphs", file=sys.stderr)
    print(f"{result['model']}: {result['sequences']} {inputs}, max inf-norm {result['max_inf_norm']:.2f} "
          f"(layer {result['max_inf_norm_layer']}), avg kurtosis {result['avg_kurtosis']:.2f}, "
          f"{result['outliers']['total']} outliers"
          + ("" if share is None else f" ({100 * share:.0f}% on delimiters)"))
    if result["registers"] is not None:
        registers = result["registers"]
        print(f"{registers['count']} register tokens (left out of the above): max inf-norm "
              f"{registers['max_inf_norm']:.2f} (layer {registers['max_inf_norm_layer']})")
    print(f"no-op mechanism: sink share {100 * result['sink_share']:.1f}% (max layer), "
          f"{100 * result['dormant_share']:.0f}% of heads >= 50% on the first token, value drain "
          f"{result['value_drain_min']:.3g}-{result['value_drain']:.3g}, residual peak {result['residual_peak']:.3g}")
    if result.get("alive_share") is not None:  # clipped softmax, softpick: is attention alive at all?
        dead = result["dead_layers"]
        print(f"attention entries above zero: {', '.join(f'{100 * a:.2g}%' for a in result['alive_share_per_layer'])} "
              f"per layer" + (f"; dead (no gradient into q, k, v): layer(s) {', '.join(map(str, dead))}" if dead else ""))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'report.md'} and {len(result['figures'])} figures")
    return 0
