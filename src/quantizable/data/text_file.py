"""Reading text files (UTF-8 checked, gzip, pipes read once) and evaluation batches from them, tokenized with the
model's own tokenizer.

Paragraphs (blank-line separated; in a file without blank lines, its lines) are packed greedily into sequences of
at most ``seq_len`` tokens including the tokenizer's special tokens ([CLS]/[SEP] for BERT, <s> for Llama), so
delimiters appear as in real inputs.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TEXT_PATTERNS = ("*.txt", "*.txt.gz")  # the files a text directory contributes
_STREAMS: dict[str, str] = {}  # pipes and FIFOs read so far: they give their contents only once


def read_text_file(path: Path) -> str:
    """A text file's contents, refusing what is not UTF-8 text: decoding a binary file with replacement characters
    would train (or evaluate) on noise without a word. Gzip is decompressed; a pipe or FIFO (``<(zcat f.gz)``) is
    read once and kept, since training reads its source once per split and a second read would find it empty or
    wait forever."""
    path = Path(path)
    stream = not path.is_file()
    if stream and str(path) in _STREAMS:
        return _STREAMS[str(path)]
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # the gzip magic number, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path} is gzip but not a complete gzip file ({error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (undecodable byte at offset {error.start}); convert it to UTF-8 "
                         "or choose a text file") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes: a binary file, not text")
    if stream:
        _STREAMS[str(path)] = text
    return text


def text_files(directory: Path) -> list[Path]:
    """The text files under a directory, in a fixed order."""
    return sorted(p for pattern in TEXT_PATTERNS for p in directory.rglob(pattern) if p.is_file())


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; in a text without blank lines, each line (one sentence per line)."""
    blocks = [block for block in re.split(r"\n\s*\n", text) if block.strip()]
    if len(blocks) == 1:
        blocks = blocks[0].splitlines()
    return [" ".join(p.split()) for p in blocks if p.strip()]


def pack_paragraphs(text: str, tokenizer: Any, seq_len: int) -> list[str]:
    """Paragraphs joined into chunks whose token count (with special tokens) fits in ``seq_len``; longer
    paragraphs become their own chunk and are truncated when tokenized."""
    budget = seq_len - tokenizer.num_special_tokens_to_add(pair=False)
    chunks, current, used = [], [], 0
    for paragraph in _paragraphs(text):
        size = len(tokenizer(paragraph, add_special_tokens=False)["input_ids"])
        if current and used + size > budget:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(paragraph)
        used += size
    if current:
        chunks.append(" ".join(current))
    return chunks


def text_batches(path: str | Path, tokenizer: Any, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """``{"input_ids", "attention_mask"}`` batches of a UTF-8 text file (gzip too) or of the ``.txt`` / ``.txt.gz``
    files under a directory (right-padded, padding masked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such text file or directory: {path}")
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise FileNotFoundError(f"no .txt or .txt.gz files found under {path}")
        text = "\n\n".join(read_text_file(file) for file in files)
    else:
        text = read_text_file(path)
    chunks = pack_paragraphs(text, tokenizer, seq_len)
    if not chunks:
        raise ValueError(f"{path} holds no text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    for index, start in enumerate(range(0, len(chunks), batch_size)):
        if max_batches is not None and index >= max_batches:
            return
        encoded = tokenizer(chunks[start:start + batch_size], truncation=True, max_length=seq_len,
                            padding=True, return_tensors="pt")
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
