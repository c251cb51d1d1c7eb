"""The Bigram-Backcopy task (Guo et al. 2024, "Active-Dormant Attention Heads", arXiv 2410.13835).

A synthetic causal-LM task built so that an attention head must work on a few tokens and do nothing elsewhere: the
paper's no-op situation in its purest form. A sequence is ``BOS x_1 x_2 ...``; after a *trigger* token the next token
repeats the one before the trigger (``x_t = x_{t-2}`` when ``x_{t-1}`` is a trigger: copying needs attention);
otherwise it is drawn from a bigram model (``x_t ~ P(. | x_{t-1})``: the FFN can do it, attention has nothing to add).

The bigram model is the character bigram table of the embedded corpus restricted to its ``vocab`` most frequent
characters; the triggers are the ``triggers`` most frequent ones. Sequences are a pure function of the source
settings, the split and the sequence length, so every run, verb and machine sees the same data.

The data source is the string ``backcopy`` with optional parameters, e.g.
``data.source=backcopy:vocab=64,triggers=3,train=32768,validation=512,seed=0``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from quantizable.data.common import NOT_PREPARED, check_split, resolve_root

NAME = "backcopy"
SPECIAL_TOKENS = ("<s>", "<pad>", "<unk>")  # ids 0, 1, 2; characters follow from id 3
BOS_ID, PAD_ID = 0, 1
FIRST_CHAR_ID = len(SPECIAL_TOKENS)
_SPLIT_STREAM = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class BackcopySource:
    """Parameters of the task: alphabet size, trigger count, sequences per split and the data seed."""

    vocab: int = 64
    triggers: int = 3
    train: int = 32768
    validation: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not 4 <= self.vocab <= 256:
            raise ValueError(f"backcopy vocab must lie in 4..256 characters, got {self.vocab}")
        if not 1 <= self.triggers < self.vocab // 2:
            raise ValueError(f"backcopy triggers must lie in 1..{self.vocab // 2 - 1} for vocab={self.vocab}, "
                             f"got {self.triggers}")
        if self.train < 1 or self.validation < 1:
            raise ValueError(f"backcopy needs >= 1 sequence per split, got train={self.train}, "
                             f"validation={self.validation}")

    def to_source(self) -> str:
        return f"{NAME}:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def is_backcopy(source: Any) -> bool:
    return isinstance(source, str) and (source == NAME or source.startswith(f"{NAME}:"))


def parse_source(source: str) -> BackcopySource:
    """``backcopy`` or ``backcopy:key=value,...`` (keys: the fields of :class:`BackcopySource`, integer values)."""
    if not is_backcopy(source):
        raise ValueError(f"not a backcopy source: {source!r}")
    _, _, params = source.partition(":")
    known = [f.name for f in dataclasses.fields(BackcopySource)]
    values: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"bad backcopy parameter {item!r}; use key=value with keys {', '.join(known)}")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"backcopy parameter {key} must be an integer, got {raw!r}") from None
    return BackcopySource(**values)


@dataclass(frozen=True)
class BigramTable:
    """The characters of the task (most frequent first), the bigram probabilities over them and the triggers."""

    chars: tuple[str, ...]
    probs: np.ndarray  # (V, V): row a holds P(next = b | a)
    unigram: np.ndarray  # (V,): frequencies, for the first token
    triggers: tuple[int, ...]  # character indices (0-based within chars)

    @property
    def entropy(self) -> np.ndarray:
        """Per-row entropy in nats: the loss of a perfect bigram predictor."""
        p = self.probs
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


@functools.lru_cache(maxsize=8)
def bigram_table(vocab: int, triggers: int, root: str | None = None) -> BigramTable:
    """Character bigrams of the embedded corpus's training text, restricted to its ``vocab`` most frequent
    characters (pairs with a character outside them are dropped); rows are smoothed by one count per entry so every
    transition is possible."""
    path = resolve_root(root) / "text" / "train.txt"
    if not path.is_file():
        raise FileNotFoundError(NOT_PREPARED.format(root=resolve_root(root)))
    codes = np.frombuffer(path.read_text(encoding="utf-8").encode("utf-32-le"), dtype=np.uint32)
    values, counts = np.unique(codes, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:vocab]
    if len(order) < vocab:
        raise ValueError(f"the corpus has only {len(order)} distinct characters, backcopy vocab={vocab} asked")
    alphabet = values[order]
    index = np.full(int(values.max()) + 1, -1, dtype=np.int64)
    index[alphabet] = np.arange(vocab)
    mapped = index[codes]
    keep = (mapped[:-1] >= 0) & (mapped[1:] >= 0)
    pairs = mapped[:-1][keep] * vocab + mapped[1:][keep]
    table = np.bincount(pairs, minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float64) + 1.0
    probs = table / table.sum(1, keepdims=True)
    unigram = counts[order].astype(np.float64) / counts[order].sum()
    return BigramTable(tuple(chr(int(c)) for c in alphabet), probs, unigram, tuple(range(triggers)))


def generate(table: BigramTable, sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """``(sequences, seq_len)`` token ids (BOS = 0, characters from id 3) following the backcopy rule.

    Position 1 is drawn from the unigram frequencies of the non-trigger characters, so every trigger has a
    character before it to copy.
    """
    if seq_len < 3:
        raise ValueError(f"backcopy sequences need seq_len >= 3 (BOS and a copy), got {seq_len}")
    rng = np.random.default_rng(seed)
    vocab = len(table.chars)
    is_trigger = np.zeros(vocab, dtype=bool)
    is_trigger[list(table.triggers)] = True
    cdf = np.cumsum(table.probs, axis=1)
    cdf[:, -1] = 1.0
    first = np.where(is_trigger, 0.0, table.unigram)
    first_cdf = np.cumsum(first / first.sum())
    first_cdf[-1] = 1.0
    chars = np.empty((sequences, seq_len - 1), dtype=np.int64)
    chars[:, 0] = np.searchsorted(first_cdf, rng.random(sequences), side="right")
    for t in range(1, seq_len - 1):
        previous = chars[:, t - 1]
        drawn = (cdf[previous] <= rng.random(sequences)[:, None]).sum(1)
        chars[:, t] = np.where(is_trigger[previous], chars[:, t - 2] if t >= 2 else drawn, drawn)
    ids = np.empty((sequences, seq_len), dtype=np.int64)
    ids[:, 0] = BOS_ID
    ids[:, 1:] = chars + FIRST_CHAR_ID
    return ids


class BackcopyBlocks(Dataset):
    """The sequences of one split as ``{"input_ids": (seq_len,)}`` items, like the text datasets' blocks."""

    def __init__(self, ids: np.ndarray):
        self.ids = torch.from_numpy(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index]}


def backcopy_dataset(split: str, seq_len: int, source: str, root: str | Path | None = None) -> BackcopyBlocks:
    """The ``split`` sequences of a backcopy source (train and validation are independent draws of one seed)."""
    check_split(split)
    spec = parse_source(source)
    table = bigram_table(spec.vocab, spec.triggers, str(root) if root is not None else None)
    count = spec.train if split == "train" else spec.validation
    seed = int(np.random.SeedSequence([spec.seed, _SPLIT_STREAM[split], seq_len]).generate_state(1)[0])
    return BackcopyBlocks(generate(table, count, seq_len, seed))


def backcopy_tokenizer(source: str, root: str | Path | None = None) -> Any:
    """A character-level fast tokenizer of the task's alphabet (``<s>`` = 0, ``<pad>`` = 1, ``<unk>`` = 2), so a
    trained run saves a tokenizer that decodes its tokens and labels them in ``analyze``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = parse_source(source)
    table = bigram_table(spec.vocab, spec.triggers, str(root) if root is not None else None)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: FIRST_CHAR_ID + i for i, char in enumerate(table.chars)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


@torch.no_grad()
def backcopy_scores(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], source: str,
                    root: str | Path | None = None) -> dict[str, float]:
    """The task's own metrics on ``batches``: copy accuracy (argmax) on the positions right after a trigger, and
    the mean cross-entropy (nats) on the bigram positions (from position 2 on, not after a trigger) beside the
    exact bigram entropy of the same positions: their difference is what the model still has to learn."""
    spec = parse_source(source)
    table = bigram_table(spec.vocab, spec.triggers, str(root) if root is not None else None)
    trigger_ids = torch.tensor(table.triggers) + FIRST_CHAR_ID
    entropy = torch.from_numpy(table.entropy)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = copies = 0
    loss = ent = 0.0
    bigrams = 0
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids.to(device)).logits.float().cpu()[:, :-1]  # logits[:, t-1] predict ids[:, t]
        target, previous = ids[:, 1:], ids[:, :-1]
        after_trigger = torch.isin(previous, trigger_ids)
        bigram = ~after_trigger
        bigram[:, 0] = False  # position 1 follows BOS: unigram, not bigram
        correct += int((logits.argmax(-1)[after_trigger] == target[after_trigger]).sum())
        copies += int(after_trigger.sum())
        nll = torch.nn.functional.cross_entropy(logits[bigram], target[bigram], reduction="sum")
        loss += float(nll)
        ent += float(entropy[(previous[bigram] - FIRST_CHAR_ID)].sum())
        bigrams += int(bigram.sum())
    model.train(was_training)
    if copies == 0 or bigrams == 0:
        raise ValueError("backcopy scoring saw no copy or no bigram positions")
    return {"copy_accuracy": correct / copies, "bigram_loss": loss / bigrams, "bigram_entropy": ent / bigrams,
            "copy_positions": copies, "bigram_positions": bigrams,
            "bigram_excess": loss / bigrams - ent / bigrams, "perplexity_floor": math.exp(ent / bigrams)}


@torch.no_grad()
def backcopy_bos_shares(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], source: str,
                        root: str | Path | None = None) -> dict[str, list[float]]:
    """Per layer, the attention (mean over heads) that queries put on BOS, split by what the next token needs:
    queries at a trigger (they must copy) and the others (nothing to do: Guo et al.'s dormant-head measure).
    Queries 0 and 1 are left out (position 1 sees only BOS and itself)."""
    from quantizable.analysis.recording import recording

    spec = parse_source(source)
    table = bigram_table(spec.vocab, spec.triggers, str(root) if root is not None else None)
    trigger_ids = torch.tensor(table.triggers) + FIRST_CHAR_ID
    sums: dict[int, list[float]] = {}

    def record(layer: int, name: str, x: torch.Tensor) -> None:
        if name == "probs":
            on_bos = x[:, :, 2:, 0].float().mean(1).cpu()  # (B, T - 2), mean over heads
            total = sums.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
            total[0] += float(on_bos[current].sum())
            total[1] += int(current.sum())
            total[2] += float(on_bos[~current].sum())
            total[3] += int((~current).sum())

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for batch in batches:
        ids = batch["input_ids"]
        current = torch.isin(ids[:, 2:], trigger_ids)
        with recording(model, record, with_attention=True):
            model(input_ids=ids.to(device))
    model.train(was_training)
    layers = sorted(sums)
    return {"bos_share_copy_per_layer": [sums[l][0] / max(sums[l][1], 1) for l in layers],
            "bos_share_other_per_layer": [sums[l][2] / max(sums[l][3], 1) for l in layers]}
