"""The text pipeline at corpus scale (issue 30): tokens/s of the ``datasets`` tokenization with 1 and N processes,
peak memory (which must not grow with the corpus) and the time to the first batch when the cache exists.

A corpus of the wanted size is generated under ``--work`` (not in the repository) from the embedded corpus's
documents, shuffled and numbered so that no two are the same. Each measurement runs in a fresh process on a fresh
data root, so its peak RSS (``ru_maxrss``: its own, and the largest of its worker processes) is its alone.

    python benchmarks/bench_text_pipeline.py --sizes-mb 50 200 --procs 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from quantizable.benchmarking import BenchmarkRun

RESULT = Path(__file__).parent / "results" / "text_pipeline.json"


def make_corpus(path: Path, megabytes: int, source_root: Path) -> Path:
    """``megabytes`` of blank-line separated documents: the embedded corpus's, shuffled, each one numbered."""
    if path.exists() and path.stat().st_size >= megabytes * 1e6:
        return path
    documents = (source_root / "text" / "train.txt").read_text().split("\n\n")
    rng = np.random.default_rng(0)
    written, number = 0, 0
    with open(path, "w") as handle:
        while written < megabytes * 1e6:
            for index in rng.permutation(len(documents)):
                text = f"Part {number}.\n{documents[index].strip()}\n\n"
                handle.write(text)
                written, number = written + len(text.encode()), number + 1
                if written >= megabytes * 1e6:
                    break
    return path


class PeakAnonymousMemory:
    """The largest ``RssAnon`` (heap and other private memory, from ``/proc/self/status``) seen while running:
    ``ru_maxrss`` also counts the pages of memory-mapped files this process has read (the Arrow files, the token
    shards), which the kernel drops when memory is short and which grow with the corpus by design."""

    def __init__(self) -> None:
        self.peak_kb, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("RssAnon"))
            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak_kb / 1024


def measure_once(corpus: Path, root: Path, procs: int, tokenizer_kind: str, task: str, seq_len: int) -> dict:
    """In this process: tokenize the training split into ``root`` (cold), then open it again and take the first
    shuffled batch (warm), as a second run of training would."""
    from quantizable.data import load_tokenizer, make_loader, text_dataset
    from quantizable.data.text import cached_token_stream, clm_collator, mlm_collator

    tokenizer = load_tokenizer(tokenizer_kind)
    (root / "text").mkdir(parents=True, exist_ok=True)
    anonymous = PeakAnonymousMemory()
    start = time.perf_counter()
    tokens = len(cached_token_stream("train", tokenizer, task, source=str(corpus), root=root, num_proc=procs))
    tokenize_s = time.perf_counter() - start
    peak_anonymous = anonymous.stop()
    rss_after_tokenizing = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    data = text_dataset("train", tokenizer, seq_len, task, source=str(corpus), root=root)
    collate = mlm_collator(tokenizer, seed=0) if task == "mlm" else clm_collator()
    next(iter(make_loader(data, 32, collate, shuffle=True, seed=0)))
    first_batch_s = time.perf_counter() - start
    return {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "procs": procs, "tokens": tokens,
            "tokenize_s": round(tokenize_s, 1), "tokens_per_s": round(tokens / tokenize_s),
            "peak_rss_mb": round(rss_after_tokenizing), "peak_anonymous_rss_mb": round(peak_anonymous),
            "cached_first_batch_s": round(first_batch_s, 3),
            "peak_rss_workers_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "wordpiece"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantizable-text-bench"))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--one", nargs=3, metavar=("CORPUS", "ROOT", "PROCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    task = "clm" if args.tokenizer == "bpe" else "mlm"
    if args.one:
        corpus, root, procs = args.one
        print(json.dumps(measure_once(Path(corpus), Path(root), int(procs), args.tokenizer, task, args.seq_len)))
        return

    from quantizable.data import default_data_dir

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "one"}
    run = BenchmarkRun("text_pipeline", {**settings, "task": task})
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for megabytes in args.sizes_mb:
        corpus = make_corpus(args.work / f"corpus-{megabytes}mb.txt", megabytes, default_data_dir())
        for procs in args.procs:
            root = args.work / f"root-{megabytes}-{procs}"
            shutil.rmtree(root, ignore_errors=True)
            environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                           "QUANTIZABLE_DATA": str(default_data_dir())}
            done = subprocess.run([sys.executable, __file__, "--tokenizer", args.tokenizer, "--seq-len",
                                   str(args.seq_len), "--one", str(corpus), str(root), str(procs)],
                                  capture_output=True, text=True, env=environment)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "load_average": list(os.getloadavg())})
            print(rows[-1], flush=True)
            shutil.rmtree(root, ignore_errors=True)
            run.write(args.out, rows)


if __name__ == "__main__":
    main()
