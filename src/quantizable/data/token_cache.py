"""Token streams of whole corpora: tokenized once in parallel (``datasets.Dataset.map(batched=True, num_proc=N)``),
kept as ``.npy`` shards under ``root/cache`` and read memory-mapped.

BookCorpus + English Wikipedia is ~4-5 billion tokens: held in a Python list and loaded whole by ``np.load`` that
was ~10 GB of RAM in every DDP rank, each of which tokenized it again. Now the main process tokenizes while the
other ranks wait, and every rank maps the same files: a rank's memory holds only the blocks its batches read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SHARD_TOKENS = 1 << 28  # 512 MB of uint16 ids per file
MAP_BATCH = 512  # documents per tokenizer call
FIRST_CHUNK_DOCUMENTS = 256  # with max_tokens: tokenize chunks of documents, doubling, until there are enough
DOCUMENTS_PER_PROCESS = 5_000  # below this many documents per process, starting processes costs more than it saves


class TokenShards:
    """Several memory-mapped token files read as one stream: ``len`` and contiguous slices."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(shard) for shard in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("token shards take contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, position = [], start
        for number in range(max(first, 0), len(self.shards)):
            if position >= stop:
                break
            offset = position - int(self.starts[number])
            piece = self.shards[number][offset:offset + stop - position]
            pieces.append(piece)
            position += len(piece)
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)


def default_num_proc() -> int:
    """Tokenizer processes: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def token_dtype(vocabulary_size: int) -> type:
    return np.uint16 if vocabulary_size <= np.iinfo(np.uint16).max + 1 else np.int32


def open_token_stream(directory: Path) -> np.ndarray | TokenShards:
    """The cached stream, memory-mapped (nothing is read until a block is)."""
    shards = [np.load(path, mmap_mode="r", allow_pickle=False) for path in sorted(directory.glob("*.npy"))]
    return shards[0] if len(shards) == 1 else TokenShards(shards)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """In a distributed run, the main process builds the cache while the other ranks wait, then they read it."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield
    else:
        yield


def _id_chunks(mapped: list[Any]) -> Iterator[np.ndarray]:
    for piece in mapped:
        for chunk in piece.data.table.column("ids").chunks:
            yield chunk.flatten().to_numpy(zero_copy_only=False)


def _total(piece: Any) -> int:
    import pyarrow.compute

    return int(pyarrow.compute.sum(pyarrow.compute.list_value_length(piece.data.table.column("ids"))).as_py() or 0)


def _tokenize_chunks(documents: Any, encode: Callable[[dict], dict], max_tokens: int | None, num_proc: int,
                     work: Path) -> list[Any]:
    """Tokenized documents (Arrow files in ``work``), in order: all of them, or with ``max_tokens`` growing chunks
    until they hold that many tokens."""
    import datasets

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})

    def tokenize(chunk: Any, number: int) -> Any:
        procs = min(num_proc, len(chunk) // DOCUMENTS_PER_PROCESS)
        return chunk.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=chunk.column_names,
                         features=features, num_proc=procs if procs > 1 else None, load_from_cache_file=False,
                         cache_file_name=str(work / f"tokens-{number}.arrow"), new_fingerprint=f"tokens-{number}")

    if max_tokens is None:
        return [tokenize(documents, 0)]
    pieces, start, size, total = [], 0, FIRST_CHUNK_DOCUMENTS, 0
    while start < len(documents) and total < max_tokens:
        pieces.append(tokenize(documents.select(range(start, min(len(documents), start + size))), len(pieces)))
        total += _total(pieces[-1])
        start, size = start + size, size * 2
    return pieces


def write_token_stream(documents: Any, encode: Callable[[dict], dict], dtype: type, directory: Path,
                       max_tokens: int | None, num_proc: int, unknown_id: int | None) -> tuple[int, int]:
    """Tokenize ``documents`` (a ``datasets.Dataset``) with ``encode`` (a batched map function giving ``ids``) into
    ``directory`` (``00000.npy``, ...; written beside it and renamed, so a directory is complete or absent).
    Returns (tokens, unknown tokens); nothing is written for an empty stream."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        pieces = _tokenize_chunks(documents, encode, max_tokens, num_proc, work)
        total = sum(_total(piece) for piece in pieces)
        total = total if max_tokens is None else min(total, max_tokens)
        if total == 0:
            return 0, 0
        staging = work / "shards"
        staging.mkdir()
        # plain appends, not a writable memory map, whose dirty pages would count as this process's memory
        handles = [open(staging / f"{k:05d}.npy", "wb") for k in range(-(-total // SHARD_TOKENS))]
        for k, handle in enumerate(handles):
            np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False,
                                                          "shape": (min(SHARD_TOKENS, total - k * SHARD_TOKENS),)})
        position, unknown = 0, 0
        for ids in _id_chunks(pieces):
            ids = ids[:total - position]
            unknown += int(np.count_nonzero(ids == unknown_id)) if unknown_id is not None else 0
            while len(ids):
                shard, offset = divmod(position, SHARD_TOKENS)
                room = min(len(ids), SHARD_TOKENS - offset)
                handles[shard].write(ids[:room].astype(dtype).tobytes())
                ids, position = ids[room:], position + room
            if position >= total:
                break
        for handle in handles:
            handle.close()
        with contextlib.suppress(OSError):  # another process finished the same cache first: keep that one
            staging.replace(directory)
        return total, unknown
    finally:
        shutil.rmtree(work, ignore_errors=True)
