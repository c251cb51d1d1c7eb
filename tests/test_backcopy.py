"""The Bigram-Backcopy task: its generation rule, its bigram statistics, its metrics and its place in reproduce."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from quantizable.data.backcopy import (BOS_ID, FIRST_CHAR_ID, BackcopySource, backcopy_dataset, backcopy_scores,
                                       backcopy_tokenizer, bigram_table, generate, parse_source)
from quantizable.training.config import load_config


@pytest.fixture(scope="module")
def table():
    return bigram_table(64, 3)


def test_the_table_is_the_corpus_character_bigrams(table):
    # recount every pair of the corpus in plain Python, independent of the numpy pipeline
    from collections import Counter

    from quantizable.data.common import default_data_dir

    text = (default_data_dir() / "text" / "train.txt").read_text(encoding="utf-8")
    frequent = [c for c, _ in Counter(text).most_common(64)]
    assert list(table.chars) == frequent and table.triggers == (0, 1, 2) and frequent[0] == " "
    pairs = Counter(zip(text, text[1:]))
    index = {c: i for i, c in enumerate(frequent)}
    counts = np.ones((64, 64))  # add-one smoothing
    for (a, b), n in pairs.items():
        if a in index and b in index:
            counts[index[a], index[b]] += n
    assert np.allclose(table.probs, counts / counts.sum(1, keepdims=True), rtol=1e-12, atol=0)


def test_every_token_after_a_trigger_repeats_the_one_before_it(table):
    ids = generate(table, 2000, 64, seed=3)
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, 1:] >= FIRST_CHAR_ID).all()
    triggers = np.isin(ids, np.array(table.triggers) + FIRST_CHAR_ID)
    assert not triggers[:, 1].any()  # the first character always has a predecessor to copy
    rows, cols = np.nonzero(triggers[:, 1:-1])
    cols += 1
    assert len(rows) > 10_000
    assert (ids[rows, cols + 1] == ids[rows, cols - 1]).all()


def test_bigram_frequencies_follow_the_table(table):
    ids = generate(table, 4000, 64, seed=0) - FIRST_CHAR_ID
    previous, following = ids[:, 1:-1].ravel(), ids[:, 2:].ravel()
    free = ~np.isin(previous, table.triggers)
    counts = np.zeros((64, 64))
    np.add.at(counts, (previous[free], following[free]), 1)
    for row in np.argsort(-counts.sum(1))[:8]:  # the well-sampled rows (>= several thousand transitions)
        empirical = counts[row] / counts[row].sum()
        tolerance = 4 * np.sqrt(table.probs[row] * (1 - table.probs[row]) / counts[row].sum()) + 1e-3
        assert (np.abs(empirical - table.probs[row]) <= tolerance).all(), table.chars[row]


def test_generation_is_deterministic_per_seed_and_split():
    a = backcopy_dataset("train", 32, "backcopy:train=64,validation=16").ids
    b = backcopy_dataset("train", 32, "backcopy:train=64,validation=16").ids
    other_seed = backcopy_dataset("train", 32, "backcopy:train=64,validation=16,seed=1").ids
    validation = backcopy_dataset("validation", 32, "backcopy:train=64,validation=16").ids
    assert torch.equal(a, b) and not torch.equal(a, other_seed) and not torch.equal(a[:16], validation)
    assert a.shape == (64, 32) and validation.shape == (16, 32)


def test_source_parameters_are_checked():
    assert parse_source("backcopy") == BackcopySource()
    assert parse_source("backcopy:vocab=32,triggers=2").to_source().startswith("backcopy:vocab=32,triggers=2")
    for bad, message in (("backcopy:size=3", "bad backcopy parameter"), ("backcopy:vocab=x", "integer"),
                         ("backcopy:vocab=2", "vocab"), ("backcopy:triggers=40", "triggers")):
        with pytest.raises(ValueError, match=message):
            parse_source(bad)
    with pytest.raises(ValueError, match="triggers"):  # caught when the config is read, before training
        load_config("opt-backcopy", ["data.source=backcopy:triggers=0"])
    with pytest.raises(ValueError, match="causal-LM"):
        from quantizable.data import text_dataset
        text_dataset("train", None, 64, "mlm", source="backcopy")


def test_tokenizer_decodes_the_alphabet(table):
    tokenizer = backcopy_tokenizer("backcopy")
    assert len(tokenizer) == 64 + FIRST_CHAR_ID and tokenizer.bos_token_id == BOS_ID
    ids = [FIRST_CHAR_ID + table.chars.index(c) for c in "the end"]
    assert tokenizer.decode(ids) == "the end" and tokenizer("the end")["input_ids"] == ids


class Oracle(torch.nn.Module):
    """Predicts with the task's true rule: the copy after a trigger, the bigram row elsewhere."""

    def __init__(self, table, wrong_copies: bool = False):
        super().__init__()
        self.table, self.wrong_copies = table, wrong_copies
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        chars = (input_ids - FIRST_CHAR_ID).clamp(min=0)
        logits = torch.log(torch.from_numpy(self.table.probs).float())[chars]
        logits = torch.nn.functional.pad(logits, (FIRST_CHAR_ID, 0), value=-1e9)
        trigger = torch.isin(chars, torch.tensor(self.table.triggers)) & (input_ids >= FIRST_CHAR_ID)
        for b, t in trigger.nonzero().tolist():
            copy = input_ids[b, t - 1] if not self.wrong_copies else (input_ids[b, t - 1] + 1) % 60 + FIRST_CHAR_ID
            logits[b, t] = -1e9
            logits[b, t, copy] = 0.0
        return SimpleNamespace(logits=logits)


def test_scores_of_the_true_rule_are_perfect(table):
    dataset = backcopy_dataset("validation", 64, "backcopy")
    batches = [{"input_ids": dataset.ids[i:i + 32]} for i in range(0, 128, 32)]
    perfect = backcopy_scores(Oracle(table), batches, "backcopy")
    assert perfect["copy_accuracy"] == 1.0
    assert abs(perfect["bigram_excess"]) < 0.02  # the model's loss equals the exact entropy up to sampling
    assert perfect["perplexity_floor"] == pytest.approx(math.exp(perfect["bigram_entropy"]))
    wrong = backcopy_scores(Oracle(table, wrong_copies=True), batches, "backcopy")
    assert wrong["copy_accuracy"] < 0.05 and wrong["bigram_loss"] == pytest.approx(perfect["bigram_loss"])


@pytest.mark.slow
def test_reproduce_backcopy_reports_mechanism_and_sensitivity(tmp_path):
    from quantizable.experiments import reproduce
    from quantizable.experiments.plan import BIT_WIDTHS

    rows = reproduce(tmp_path, "tiny", None, ("vanilla", "gated_attention"), progress=False, tasks=("backcopy",))
    assert [(r["task"], r["family"], r["method"]) for r in rows] == [
        ("backcopy", "opt", "vanilla"), ("backcopy", "opt", "gated_attention")]
    saved = json.loads((tmp_path / "results.json").read_text())
    for row in saved:
        assert set(row["bits_sweep"]) == set(BIT_WIDTHS)
        assert row["bits_sweep"]["W8A8"] == pytest.approx(row["w8a8"]["mean"])
        for key in ("sink_share", "value_drain", "residual_peak"):
            assert row[key]["mean"] > 0 and len(row[f"{key}_per_layer"]) == 2
        assert 0 <= row["scores"]["copy_accuracy"]["fp"]["mean"] <= 1
    # fewer bits can only add error: the 4-bit activations of a 12-step model lose more than 8-bit ones
    assert all(abs(r["bits_sweep"]["W8A4"] - r["fp"]["mean"]) >= abs(r["bits_sweep"]["W8A8"] - r["fp"]["mean"])
               for r in saved)
    report = (tmp_path / "report.md").read_text()
    assert report.index("Bigram-Backcopy") < report.index("Quantization sensitivity") < report.index("paper scale")
    assert (tmp_path / "sensitivity_backcopy_opt.png").is_file() and (tmp_path / "training_backcopy_opt.png").is_file()


def test_bos_shares_match_transformers_eager_attention(table):
    from quantizable import create_model
    from quantizable.data.backcopy import backcopy_bos_shares

    torch.manual_seed(0)
    model = create_model("opt-backcopy", vocab_size=64 + FIRST_CHAR_ID, num_hidden_layers=2, num_attention_heads=2).eval()
    ids = backcopy_dataset("validation", 24, "backcopy:validation=16").ids
    shares = backcopy_bos_shares(model, [{"input_ids": ids[:8]}, {"input_ids": ids[8:]}], "backcopy")
    model.set_attn_implementation("eager")  # transformers' own attention, returning its probabilities
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    copy = torch.isin(ids[:, 2:], torch.tensor(table.triggers) + FIRST_CHAR_ID)
    for layer, probs in enumerate(attentions):
        on_bos = probs[:, :, 2:, 0].mean(1)
        assert shares["bos_share_copy_per_layer"][layer] == pytest.approx(float(on_bos[copy].mean()), abs=1e-5)
        assert shares["bos_share_other_per_layer"][layer] == pytest.approx(float(on_bos[~copy].mean()), abs=1e-5)
