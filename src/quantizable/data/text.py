"""Text data: documents from the embedded corpus, local files or Hugging Face ``datasets``, packed into blocks.

A corpus is a list of documents, a document a list of segments (paragraphs, verses, sentences). Documents are
tokenized once, in parallel, into one flat stream of ids, cached as memory-mapped ``.npy`` shards under
``root/cache`` (:mod:`quantizable.data.token_cache`), and cut into fixed-length blocks:
``[CLS] ... [SEP] ... [SEP]`` for masked language modelling, ``<s> ...`` for causal language modelling.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from quantizable.data.backcopy import backcopy_dataset, backcopy_tokenizer, is_backcopy
from quantizable.data.common import NOT_PREPARED, check_split, resolve_root
from quantizable.data.text_file import read_text_file
from quantizable.data.text_sources import corpus_files, documents_dataset
from quantizable.data.token_cache import (TokenShards, default_num_proc, main_process_first, open_token_stream,
                                          token_dtype, write_token_stream)
from quantizable.tasks import Task

Document = list[str]
TASKS = (Task.MLM, Task.CLM)
TOKENIZER_KINDS = ("wordpiece", "bpe")

CACHE_FORMAT = 2  # bump when the layout of the token stream changes, so old caches are not reused (2: .npy shards)


def source_tokenizer(source: str | os.PathLike | None, kind: str, root: str | Path | None = None):
    """The tokenizer a training run on ``source`` uses: the synthetic source's own, else the project's ``kind``."""
    if is_backcopy(source):
        return backcopy_tokenizer(source, root)
    return load_tokenizer(kind, root)


def load_tokenizer(kind: str, root: str | Path | None = None):
    """The project's WordPiece (BERT-style, MLM) or byte-level BPE (CLM) tokenizer, trained on the default corpus."""
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}")
    root = resolve_root(root)
    path = root / "tokenizers" / kind
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(NOT_PREPARED.format(root=root))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def checkpoint_tokenizer(path: str | Path):
    """The tokenizer that came with a checkpoint: a run's ``model/``, a Hugging Face directory or a ``.gguf`` file
    (whose vocabulary is inside it); ``None`` when there is none, e.g. an image model."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for directory in (path / "model", path):
        if directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(directory)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:  # a directory holding a GGUF, as load_model accepts it
        return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0].name)
    return None


# ----------------------------------------------------------------------------------------------- documents

def load_documents(split: str, source: str | os.PathLike | None = None,
                   root: str | Path | None = None) -> list[Document]:
    """Documents of one split, in memory, for inspection: the embedded corpus (``None``), a local corpus file or
    folder, or a hub corpus (training reads them through :func:`cached_token_stream`, which never holds them)."""
    with tempfile.TemporaryDirectory(dir=_work_root(root)) as work:
        return list(documents_dataset(split, source, root, Path(work))["segments"])


def _work_root(root: str | Path | None) -> Path:
    """Where intermediate Arrow files go: beside the token cache (the same disk), not in /tmp."""
    path = resolve_root(root) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------- tokens and cache

def _special_ids(tokenizer: Any, task: str) -> tuple[int, int]:
    """(block prefix, separator appended after each segment or document) for the task."""
    if task == Task.MLM:
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("task 'mlm' needs a tokenizer with [CLS] and [SEP], e.g. load_tokenizer('wordpiece')")
        return tokenizer.cls_token_id, tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if bos is None:
        raise ValueError("task 'clm' needs a tokenizer with a BOS or EOS token (e.g. load_tokenizer('bpe'))")
    return bos, eos


def special_token_ids(tokenizer: Any, task: str) -> dict[str, int]:
    """The model config's ids of the tokens its data uses: padding, and for causal LM the BOS that starts every block
    and the EOS that ends every document (what ``generate()`` stops at; the family's defaults are other ids)."""
    ids = {} if tokenizer.pad_token_id is None else {"pad_token_id": tokenizer.pad_token_id}
    if task == "clm":
        bos, eos = _special_ids(tokenizer, task)
        ids.update(bos_token_id=bos, eos_token_id=eos)
    return ids


def prepend_bos_when_encoding(directory: Path, tokenizer: Any) -> None:
    """Make the causal-LM tokenizer saved in ``directory`` start every encoding with BOS, as every training block
    starts with it: ``pipeline("text-generation")`` and ``tokenizer(text)`` then give the model what it was trained
    on. (Tokenizing the corpus uses ``add_special_tokens=False`` and is unaffected.)"""
    from tokenizers import Tokenizer, processors

    bos = tokenizer.bos_token
    if bos is None or tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return
    path = directory / "tokenizer.json"
    backend = Tokenizer.from_file(str(path))
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                             special_tokens=[(bos, tokenizer.bos_token_id)])
    existing = backend.post_processor
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    backend.save(str(path))


def _encoder(tokenizer: Any, task: str) -> Callable[[dict], dict]:
    """The batched map function of tokenization: MLM puts [SEP] after every segment, CLM joins a document's lines
    and ends it with EOS (a document's ids in order; their concatenation is the stream)."""
    _, separator = _special_ids(tokenizer, task)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        documents = batch["segments"]
        if task == Task.CLM:
            return {"ids": [ids + [separator] for ids in
                            tokenizer(["\n".join(d) for d in documents], add_special_tokens=False)["input_ids"]]}
        encoded = iter(tokenizer([s for d in documents for s in d], add_special_tokens=False)["input_ids"])
        return {"ids": [[token for _ in document for token in [*next(encoded), separator]] for document in documents]}

    return encode


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _source_fingerprint(split: str, source: str | None, root: Path) -> str:
    """Content for the default corpus (manifest hash), path + size + mtime for local files, content for a pipe or
    FIFO (whose path and size say nothing), the name for hubs."""
    if source is None:
        manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else {}
        return manifest.get("files", {}).get(f"text/{split}.txt", {}).get("sha256", "unprepared")
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir() and not path.is_file():
        return hashlib.sha256(read_text_file(path).encode()).hexdigest()
    if path.exists():
        return json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in corpus_files(path)])
    return source


def cached_token_stream(split: str, tokenizer: Any, task: str, source: str | os.PathLike | None = None,
                        root: str | Path | None = None, max_tokens: int | None = None,
                        num_proc: int | None = None) -> np.ndarray | TokenShards:
    """Token ids of a whole split, tokenized once with ``num_proc`` processes (default: one per CPU) and kept as
    ``root/cache/tokens-<key>/*.npy``; returned memory-mapped. In a distributed run only the main process
    tokenizes."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    check_split(split)
    root = resolve_root(root)
    source = os.fspath(source) if source is not None else None
    key = hashlib.sha256(json.dumps([_tokenizer_fingerprint(tokenizer), split, _source_fingerprint(split, source, root),
                                     task, max_tokens, CACHE_FORMAT]).encode()).hexdigest()[:24]
    directory = root / "cache" / f"tokens-{key}"
    where = f"the {split} split of {source or root / 'text'}"
    with main_process_first():
        if not directory.is_dir():
            with tempfile.TemporaryDirectory(dir=_work_root(root)) as work:
                documents = documents_dataset(split, source, root, Path(work), num_proc or default_num_proc())
                total, unknown = write_token_stream(documents, _encoder(tokenizer, task), token_dtype(len(tokenizer)),
                                                    directory, max_tokens, num_proc or default_num_proc(),
                                                    getattr(tokenizer, "unk_token_id", None))
            if total == 0:
                raise ValueError(f"the {split} split of text source {source or root / 'text'} is empty (no tokens)")
            _warn_unknown_tokens(unknown / total, tokenizer, where)
    return open_token_stream(directory)


UNKNOWN_WARNING = 0.05  # above this share of [UNK] tokens the model would learn the text's characters as one token


def _warn_unknown_tokens(share: float, tokenizer: Any, where: str) -> None:
    """Say when the tokenizer does not cover the text (CJK or emoji with the English WordPiece: 56-78% [UNK])."""
    if share > UNKNOWN_WARNING:
        print(f"warning: {share:.0%} of the tokens of {where} are {tokenizer.unk_token}: the tokenizer "
              f"(data.tokenizer) does not cover this text's characters; fine-tune a checkpoint whose tokenizer does "
              f"(train --init-from), or for a causal LM use data.tokenizer=bpe (byte-level, never unknown)",
              file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- blocks

class TextBlocks(Dataset):
    """Fixed-length blocks cut from a token stream: ``prefix`` + body (+ ``suffix``), no padding, no overlap."""

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int, prefix: int, suffix: int | None = None):
        body = seq_len - 1 - (suffix is not None)
        if body < 1:
            raise ValueError(f"seq_len {seq_len} is too short for a block")
        self.tokens, self.seq_len, self.prefix, self.suffix, self.body = tokens, seq_len, prefix, suffix, body
        if len(self) == 0:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one block of seq_len {seq_len}")

    def __len__(self) -> int:
        return len(self.tokens) // self.body

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        body = self.tokens[index * self.body:(index + 1) * self.body].astype(np.int64)
        ids = [[self.prefix], body] + ([[self.suffix]] if self.suffix is not None else [])
        return {"input_ids": torch.from_numpy(np.concatenate(ids))}


def text_dataset(split: str, tokenizer: Any, seq_len: int, task: str, source: str | os.PathLike | None = None,
                 root: str | Path | None = None, max_tokens: int | None = None) -> TextBlocks:
    """Blocks of ``seq_len`` ids for ``task`` ``mlm`` ([CLS] ... [SEP]) or ``clm`` (<s> ...) from ``source``
    (the synthetic ``backcopy`` source makes its own sequences and ignores ``tokenizer``)."""
    if is_backcopy(source):
        if task != Task.CLM:
            raise ValueError(f"data.source={source} is a causal-LM task; use an OPT or Llama preset, not {task}")
        return backcopy_dataset(split, seq_len, source, root)
    tokens = cached_token_stream(split, tokenizer, task, source, root, max_tokens)
    prefix, separator = _special_ids(tokenizer, task)
    return TextBlocks(tokens, seq_len, prefix, separator if task == Task.MLM else None)


# ---------------------------------------------------------------------------------------------- collators

def _stack(examples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([example["input_ids"] for example in examples])


def mlm_collator(tokenizer: Any, probability: float = 0.15,
                 seed: int | None = None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """BERT masking (80 % [MASK], 10 % random token, 10 % unchanged) of ``probability`` of the non-special tokens.

    With ``seed`` the masks are a function of the seed and the batch's ids alone, so the FP and the quantized model
    see identical masks for the same batch, however often or in whatever order the collator is called.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("mlm_collator needs a tokenizer with a [MASK] token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    vocab = len(tokenizer)

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = _stack(examples)
        if seed is None:
            generator = None
        else:
            digest = hashlib.sha256(input_ids.numpy().tobytes()).digest()
            generator = torch.Generator().manual_seed(seed ^ int.from_bytes(digest[:7], "little"))
        chosen = torch.rand(input_ids.shape, generator=generator) < probability
        chosen &= ~torch.isin(input_ids, special)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        action = torch.rand(input_ids.shape, generator=generator)
        random_ids = torch.randint(vocab, input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        masked[swap] = random_ids[swap]
        pad = tokenizer.pad_token_id
        attention_mask = (input_ids != pad).long() if pad is not None else torch.ones_like(input_ids)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}

    return collate


def clm_collator() -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Causal LM batches: the model shifts the labels itself, so labels are the input ids."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = _stack(examples)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    return collate
