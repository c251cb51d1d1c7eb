"""Text sources on ``datasets`` (issue 30): local parquet / jsonl / txt folders, the paper's BookCorpus + Wikipedia mix
(hub loader mocked), token shards read memory-mapped, and each DDP rank reading its own blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantizable.data import load_documents, load_tokenizer, prepare_default_data, text_dataset
from quantizable.data import token_cache

WORDS = "river stone light garden window evening quiet letter music harbour winter paper".split()


@pytest.fixture(scope="module")
def wordpiece():
    return load_tokenizer("wordpiece", prepare_default_data(quiet=True))


def _articles(count: int, tag: str = "doc") -> list[str]:
    rng = np.random.default_rng(0)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, 10)) + ".\nSecond line of " + f"{tag}{i}." for i in range(count)]


def _markers(documents: list[list[str]]) -> set[str]:
    return {document[0].split()[0] for document in documents}


def test_parquet_and_jsonl_files_are_corpora(tmp_path, wordpiece):
    import pyarrow
    import pyarrow.parquet

    texts = _articles(60)
    pyarrow.parquet.write_table(pyarrow.table({"text": texts, "id": list(range(60))}), tmp_path / "corpus.parquet")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name in ("corpus.parquet", "corpus.jsonl"):
        train = load_documents("train", tmp_path / name, root=tmp_path)
        validation = load_documents("validation", tmp_path / name, root=tmp_path)
        assert len(train) == 57 and len(validation) == 3 and _markers(train).isdisjoint(_markers(validation))
        assert train[0] == texts[0].split("\n")  # a row's lines are its segments
    a = text_dataset("train", wordpiece, 32, "mlm", source=str(tmp_path / "corpus.parquet"), root=tmp_path)
    b = text_dataset("train", wordpiece, 32, "mlm", source=str(tmp_path / "corpus.jsonl"), root=tmp_path)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # the same text gives the same stream


def test_folder_of_text_files_ignores_hidden_ones(tmp_path):
    folder = tmp_path / "texts"
    (folder / "part" / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(_articles(20, "a")))
    (folder / "part" / "b.txt").write_text("\n".join(f"b{i} a sentence per line." for i in range(20)))
    (folder / "part" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("hidden0 must not be read.")
    documents = load_documents("train", folder, root=tmp_path) + load_documents("validation", folder, root=tmp_path)
    assert len(documents) == 40 and not any(m.startswith("hidden") for m in _markers(documents))
    assert ["b3 a sentence per line."] in documents  # a file without blank lines: one document per line


def test_bookcorpus_plus_wikipedia_is_both_sources_mixed(tmp_path, monkeypatch, wordpiece):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "bookcorpus":
            return datasets.Dataset.from_dict({"text": [f"book{i // 100} sentence {i}." for i in range(3000)]})
        return datasets.Dataset.from_dict({"id": list(range(10)), "title": ["t"] * 10,
                                           "text": [f"wiki{i} first paragraph.\n\nSecond." for i in range(10)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = load_documents("train", "bookcorpus+wikipedia", root=tmp_path)
    assert calls == [("bookcorpus", None, "train[:99%]"), ("wikimedia/wikipedia", "20231101.en", "train[:99%]")]
    markers = [document[0].split()[0] for document in documents]
    assert sorted(markers) == sorted([f"book{i}" for i in range(30)] + [f"wiki{i}" for i in range(10)])
    assert documents[[m.startswith("wiki") for m in markers].index(True)] == ["wiki0 first paragraph.", "Second."]
    first_half = markers[:20]
    assert any(m.startswith("wiki") for m in first_half) and any(m.startswith("book") for m in first_half)
    assert load_documents("train", "bookcorpus+wikipedia", root=tmp_path) == documents  # seeded mix
    load_documents("validation", "wikipedia", root=tmp_path)
    assert calls[-1] == ("wikimedia/wikipedia", "20231101.en", "train[99%:]")
    blocks = text_dataset("train", wordpiece, 16, "mlm", source="bookcorpus+wikipedia", root=tmp_path)
    assert len(blocks) > 10


def test_token_stream_in_several_shards_reads_as_one(tmp_path, wordpiece, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_articles(80)))
    whole = np.asarray(text_dataset("train", wordpiece, 32, "mlm", source=str(corpus), root=tmp_path).tokens)
    monkeypatch.setattr(token_cache, "SHARD_TOKENS", 100)
    sharded = text_dataset("train", wordpiece, 32, "mlm", source=str(corpus), root=tmp_path / "other")
    assert isinstance(sharded.tokens, token_cache.TokenShards) and len(sharded.tokens.shards) == -(-len(whole) // 100)
    assert all(isinstance(shard, np.memmap) for shard in sharded.tokens.shards)
    assert np.array_equal(sharded.tokens[0:len(whole)], whole) and np.array_equal(sharded.tokens[95:233], whole[95:233])
    assert np.array_equal(np.concatenate([sharded[i]["input_ids"][1:-1] for i in range(len(sharded))]),
                          whole[:len(sharded) * 30])


def test_each_rank_reads_its_own_blocks(tmp_path, wordpiece):
    """accelerate's process index picks a rank's batches; the rank reads only those blocks of the shared mapping."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_articles(80)))
    data = text_dataset("train", wordpiece, 16, "mlm", source=str(corpus), root=tmp_path)
    batches = BatchSampler(SequentialSampler(data), batch_size=2, drop_last=True)
    ranks = [[i for batch in BatchSamplerShard(batches, num_processes=2, process_index=rank) for i in batch]
             for rank in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(ranks[0]) == len(ranks[1]) >= len(data) // 2 - 2
    assert isinstance(data.tokens, np.memmap) and not data.tokens.flags.owndata
