"""Text sources as ``datasets.Dataset`` of documents (column ``segments``: a document's paragraphs, verses or
sentences), so that a corpus of billions of tokens is tokenized in parallel and never held in memory.

Sources: the embedded corpus, local ``.txt`` / ``.txt.gz`` / ``.parquet`` / ``.arrow`` / ``.jsonl`` / ``.json`` files
or folders of them, and hub corpora (WikiText, Wiki40B, BookCorpus, English Wikipedia and the paper's BookCorpus +
Wikipedia mix). A split without its own files holds out 5 % of the documents, spread evenly over the corpus.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantizable.data.common import (NOT_PREPARED, VALIDATION_FRACTION, check_split, load_hf_dataset,
                                     looks_like_path, resolve_root)
from quantizable.data.text_file import read_text_file

# Short names of hub corpora; value: (datasets path, config, split expression per split).
HF_SOURCES: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", {"train": "train", "validation": "validation"}),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", {"train": "train", "validation": "validation"}),
    "wiki40b": ("wiki40b", "en", {"train": "train", "validation": "validation"}),
    # BookCorpus and Wikipedia have no validation split: hold out the last 1 % of rows.
    "bookcorpus": ("bookcorpus", None, {"train": "train[:99%]", "validation": "train[99%:]"}),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", {"train": "train[:99%]", "validation": "train[99%:]"}),
}
# The paper's pre-training corpus (BERT's): both sources, every document once, mixed in proportion to their sizes.
MIXES = {"bookcorpus+wikipedia": ("bookcorpus", "wikipedia")}
MIX_SEED = 0
BOOKCORPUS_SENTENCES_PER_DOCUMENT = 100
FILE_KINDS = {".txt": "text", ".txt.gz": "text", ".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json",
              ".json": "json", ".jsonl.gz": "json"}
TEXT_COLUMNS = ("text", "content", "document")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in FILE_KINDS.items() if name.endswith(suffix)), None)


def corpus_files(path: Path) -> list[Path]:
    """A text source's files in a fixed order: the file itself, or every corpus file under a folder (hidden files
    and folders, e.g. ``.ipynb_checkpoints``, ignored)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def parse_documents(text: str) -> list[list[str]]:
    """Blank-line separated documents, one segment per non-empty line (the format of ``root/text/*.txt``)."""
    documents = []
    for block in re.split(r"\n\s*\n", text):
        segments = [line.strip() for line in block.splitlines() if line.strip()]
        if segments:
            documents.append(segments)
    return documents


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as handle:
        packed = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if packed else open(path, encoding="utf-8")


def _text_file_documents(path: Path) -> Iterator[list[str]]:
    """Documents of a text file, read line by line (memory does not grow with the file). A file without blank lines
    is one document per line; a pipe or FIFO, which gives its contents once, is read whole and kept."""
    if not path.is_file():
        documents = parse_documents(read_text_file(path))
        yield from ([[line] for line in documents[0]] if len(documents) == 1 else documents)
        return
    try:
        with _open_text(path) as handle:
            one_per_line = not any(not line.strip() for line in handle)
        with _open_text(path) as handle:
            current: list[str] = []
            for line in handle:
                if "\x00" in line:
                    raise ValueError(f"{path} holds NUL bytes: a binary file, not text")
                if line.strip():
                    current.append(line.strip())
                if current and (one_per_line or not line.strip()):
                    yield current
                    current = []
            if current:
                yield current
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (undecodable byte at offset {error.start} of a block read); "
                         "convert it to UTF-8 or choose a text file") from None
    except (OSError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path} is gzip but not a complete gzip file ({error})") from None


def _text_files_dataset(files: list[Path], cache_dir: Path) -> Any:
    import datasets

    def generate(paths: list[str], stamps: list[tuple[int, int]]) -> Iterator[dict[str, list[str]]]:
        del stamps  # only part of the fingerprint: a changed file is read again
        for file in paths:
            yield from ({"segments": document} for document in _text_file_documents(Path(file)))

    stamps = [(p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, -1) for p in files]
    features = datasets.Features({"segments": datasets.Sequence(datasets.Value("string"))})
    try:
        return datasets.Dataset.from_generator(generate, features=features, cache_dir=str(cache_dir),
                                               gen_kwargs={"paths": [str(p) for p in files], "stamps": stamps})
    except datasets.exceptions.DatasetGenerationError as error:  # our own error inside the generator
        raise error.__cause__ if isinstance(error.__cause__, (ValueError, OSError)) else error
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for a generator that gave no rows
            raise
        raise ValueError(f"{', '.join(str(p) for p in files[:3])} holds no documents: the text source is empty"
                         ) from None


def _lines_as_segments(rows: Any, num_proc: int) -> Any:
    """Rows with one whole document in a text column (Wikipedia, parquet, jsonl): its non-empty lines are its
    segments."""
    column = next((c for c in TEXT_COLUMNS if c in rows.column_names), None)
    if column is None:
        raise ValueError(f"the text source needs a column named {' or '.join(TEXT_COLUMNS)}; it has "
                         f"{', '.join(rows.column_names)}")

    def segments(batch: dict[str, list]) -> dict[str, list]:
        return {"segments": [[line.strip() for line in (text or "").splitlines() if line.strip()]
                             for text in batch[column]]}

    mapped = rows.map(segments, batched=True, remove_columns=rows.column_names, num_proc=_procs(len(rows), num_proc))
    return mapped.filter(lambda batch: [bool(s) for s in batch["segments"]], batched=True)


def _procs(rows: int, num_proc: int) -> int | None:
    """Worker processes for ``rows`` rows: none for small sets, where starting them costs more than they save."""
    procs = min(num_proc, rows // 20_000)
    return procs if procs > 1 else None


def _local_rows(files: list[Path], cache_dir: Path) -> Any:
    """A folder's or file's rows through the ``datasets`` builder of its kind (one kind per source)."""
    import datasets

    kinds = {_kind(p) or "text" for p in files}  # a file of another name (or a pipe) is read as text, as before
    if len(kinds) > 1:
        raise ValueError(f"the text source mixes file kinds ({', '.join(sorted(kinds))}); keep one kind per folder")
    kind = kinds.pop()
    if kind == "text":
        return _text_files_dataset(files, cache_dir)
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                     cache_dir=str(cache_dir))
    except Exception as error:  # noqa: BLE001 - any reader failure means "this file cannot be read"
        raise ValueError(f"could not read {files[0].parent if len(files) > 1 else files[0]} as {kind}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                         ) from error


def held_out(rows: Any, split: str, fraction: float = VALIDATION_FRACTION) -> Any:
    """The ``split`` rows of a set without its own validation split: the same choice as
    :func:`quantizable.data.common.split_documents` (validation spread evenly), computed with numpy."""
    n = len(rows)
    if n < 2:
        raise ValueError(f"the text source holds {n} document(s); splitting it into training and validation needs "
                         "at least 2 (documents are separated by blank lines, or one per line in a file without "
                         "blank lines)")
    n_val = max(1, round(n * fraction))
    validation = np.unique(((np.arange(n_val) + 0.5) * n / n_val).astype(np.int64))
    chosen = validation if split == "validation" else np.setdiff1d(np.arange(n), validation)
    return rows.select(chosen)


def _local_documents(path: Path, split: str, cache_dir: Path, num_proc: int) -> Any:
    """A file, or a folder with ``train.txt`` / ``validation.txt`` (used as given) or any corpus files."""
    if path.is_dir() and ((path / f"{split}.txt").exists() or (path / "train.txt").exists()):
        split_file = path / f"{split}.txt"
        if not split_file.exists():
            raise FileNotFoundError(f"{split_file} does not exist (the directory has train.txt, so each split "
                                    "needs its own file)")
        return _text_files_dataset([split_file], cache_dir)
    files = corpus_files(path)
    if not files:
        raise FileNotFoundError(f"no corpus files (.txt, .txt.gz, .parquet, .arrow, .jsonl, .json) under {path}")
    rows = _local_rows(files, cache_dir)
    documents = rows if "segments" in rows.column_names else _lines_as_segments(rows, num_proc)
    return held_out(documents, split)


def _wikitext(rows: Any) -> Iterator[dict[str, list[str]]]:
    """WikiText rows are lines; an article starts at a level-1 heading `` = Title = ``."""
    current: list[str] = []
    for row in rows:
        line = row["text"].strip()
        if re.fullmatch(r"= [^=].* =", line):
            if current:
                yield {"segments": current}
            current = []
        elif line and not line.startswith("="):
            current.append(line)
    if current:
        yield {"segments": current}


def _wiki40b(rows: Any) -> Iterator[dict[str, list[str]]]:
    """Wiki40B rows are whole articles with ``_START_PARAGRAPH_`` / ``_NEWLINE_`` markers."""
    for row in rows:
        paragraphs = re.findall(r"_START_PARAGRAPH_\n(.*?)(?=\n_START_|\Z)", row["text"], re.DOTALL)
        if segments := [s.strip() for p in paragraphs for s in p.split("_NEWLINE_") if s.strip()]:
            yield {"segments": segments}


def _bookcorpus(rows: Any) -> Iterator[dict[str, list[str]]]:
    """BookCorpus rows are sentences without book boundaries: consecutive sentences make a document."""
    for start in range(0, len(rows), BOOKCORPUS_SENTENCES_PER_DOCUMENT):
        chunk = rows[start:start + BOOKCORPUS_SENTENCES_PER_DOCUMENT]["text"]
        if segments := [s.strip() for s in chunk if s.strip()]:
            yield {"segments": segments}


def _hub_documents(name: str, split: str, cache_dir: Path, num_proc: int) -> Any:
    import datasets

    path, config, splits = HF_SOURCES[name]
    rows = load_hf_dataset(path, config, splits[split])
    if path == "wikimedia/wikipedia":
        return _lines_as_segments(rows, num_proc)
    reader = {"wikitext": _wikitext, "wiki40b": _wiki40b, "bookcorpus": _bookcorpus}[path]
    features = datasets.Features({"segments": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_generator(reader, features=features, cache_dir=str(cache_dir),
                                           gen_kwargs={"rows": rows})


def _mixed_documents(name: str, split: str, cache_dir: Path, num_proc: int) -> Any:
    """Every document of each source once, drawn in proportion to the sources' sizes (seeded), so any prefix of the
    stream (``max_tokens``) mixes them as the whole corpus does."""
    import datasets

    parts = [_hub_documents(part, split, cache_dir, num_proc) for part in MIXES[name]]
    total = sum(len(part) for part in parts)
    return datasets.interleave_datasets(parts, probabilities=[len(part) / total for part in parts], seed=MIX_SEED,
                                        stopping_strategy="all_exhausted_without_replacement")


def documents_dataset(split: str, source: str | os.PathLike | None, root: str | Path | None, cache_dir: Path,
                      num_proc: int = 1) -> Any:
    """The documents of one split as a ``datasets.Dataset`` with a ``segments`` column; intermediate Arrow files go
    to ``cache_dir``."""
    import datasets

    check_split(split)
    if source is None:
        root = resolve_root(root)
        path = root / "text" / f"{split}.txt"
        if not path.exists():
            raise FileNotFoundError(NOT_PREPARED.format(root=root))
        return datasets.Dataset.from_dict({"segments": parse_documents(read_text_file(path))})
    source = os.fspath(source)
    if source in HF_SOURCES:
        return _hub_documents(source, split, cache_dir, num_proc)
    if source in MIXES:
        return _mixed_documents(source, split, cache_dir, num_proc)
    path = Path(source).expanduser()
    if path.exists():
        return _local_documents(path, split, cache_dir, num_proc)
    if looks_like_path(source):
        raise FileNotFoundError(f"text source {source} does not exist")
    raise ValueError(f"unknown text source {source!r}; use a corpus file or folder (.txt, .parquet, .arrow, .jsonl) "
                     f"or one of {', '.join([*HF_SOURCES, *MIXES])}")
