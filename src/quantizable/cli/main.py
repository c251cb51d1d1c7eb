"""``quantizable`` entry point: one sub-command per verb, each in its own module under ``quantizable.cli``.

A verb module defines ``add_arguments(parser)`` and ``run(args) -> int``. Bad input (``UserError``, ``ValueError``,
``OSError`` such as ``FileNotFoundError``) prints one line and exits 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS: dict[str, str] = {
    "train": "pre-train or fine-tune a model with an attention spec",
    "analyze": "measure outliers (inf-norm, kurtosis, where they sit) and draw the paper's figures",
    "quantize": "simulated W8A8 post-training quantization with static ranges",
    "reproduce": "reproduce the paper's comparison table (vanilla vs clipped softmax vs gated attention)",
    "export": "export to real INT8 (PyTorch PT2E or ONNX Runtime) and measure speed and quality",
    "data": "prepare the embedded default datasets",
    "demo": "a tiny end-to-end demonstration of the attention variants",
}


def _quiet_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-file "Loading weights" / "Writing model shards" bars: noise around our own progress lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # read at import: already imported (e.g. main() called in a test process)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantizable")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from quantizable import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantizable",
        description="Train transformers that quantize to full INT8 without tricks "
        "(clipped softmax and gated attention, Bondarenko et al. 2023).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"quantizable {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, summary in VERBS.items():
        verb_parser = sub.add_parser(verb, help=summary, description=summary)
        # also accepted after the verb; SUPPRESS keeps a --debug given before the verb from being reset to False
        verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        try:
            module = importlib.import_module(f"quantizable.cli.{verb}")
        except ModuleNotFoundError as error:
            if error.name != f"quantizable.cli.{verb}":
                raise
            verb_parser.set_defaults(module=None)
            continue
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_usage(sys.stderr)
        print(f"error: name a verb: {', '.join(VERBS)} (quantizable VERB --help for its options)", file=sys.stderr)
        return 2
    if args.module is None:
        print(f"error: '{args.verb}' is not available in this version yet", file=sys.stderr)
        return 2
    from quantizable.cli.errors import UserError

    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():  # every verb's --out is a directory: refuse before work
        print(f"error: --out {out} is a file; every verb writes a directory there (give a new or existing folder)",
              file=sys.stderr)
        return 2
    try:
        # under a distributed launch every rank runs this with the same --out: rank 0 holds it for all of them
        if out is None or os.environ.get("RANK", "0") != "0":
            return int(args.module.run(args) or 0)
        from quantizable.io import exclusive_dir

        with exclusive_dir(out):  # one writer per output directory: a second process is refused, not interleaved
            return int(args.module.run(args) or 0)
    except (UserError, ValueError, OSError) as error:  # OSError: missing paths, a file where a folder goes, ...
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # train's says which step it saved and how to continue
        print(str(interrupt) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
