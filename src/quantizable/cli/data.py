"""``quantizable data``: build the embedded default data (``prepare``) or summarise what is there (``info``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("prepare", "info"), help="prepare: build the data (skipped when up to "
                        "date); info: print the manifest summary")
    parser.add_argument("--root", type=Path, default=None,
                        help="data directory (default: $QUANTIZABLE_DATA or ~/.cache/quantizable/data)")
    parser.add_argument("--quiet", action="store_true", help="print nothing unless something fails")


def run(args: argparse.Namespace) -> int:
    from quantizable.data import default_data_dir, prepare_default_data, read_manifest

    root = args.root or default_data_dir()
    if args.action == "prepare":
        prepare_default_data(root, quiet=args.quiet)
        return 0
    manifest = read_manifest(root)
    print(f"data directory: {root} (prepared {manifest['created']})")
    for name, stats in manifest["corpora"].items():
        print(f"  {name:22s} {stats['documents']:6d} documents {stats['words'] / 1e6:6.2f} M words "
              f"{stats['characters'] / 1e6:6.2f} M characters")
    print(f"  documents: {manifest['documents']['train']} train, {manifest['documents']['validation']} validation; "
          f"tokenizers: wordpiece, bpe ({manifest['vocab_size']} tokens)")
    for name, entry in manifest["files"].items():
        print(f"  {name:45s} {entry['bytes'] / 1e6:8.2f} MB  sha256 {entry['sha256'][:12]}")
    return 0
