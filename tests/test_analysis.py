"""Outlier analysis: metrics against direct computation, planted outliers found exactly, CLI outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM

from quantizable import create_model
from quantizable.analysis import analyze, kurtosis, transformer_blocks
from quantizable.cli.main import main
from tests.conftest import TINY_PRESETS

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]
SENTENCE = "the cat sat on the mat . a dog ran far away"


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizerFast:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    return BertTokenizerFast(vocab={token: index for index, token in enumerate(tokens)})


def _text_batch(tokenizer, n: int = 3) -> dict[str, torch.Tensor]:
    return dict(tokenizer([SENTENCE] * n, return_tensors="pt", return_token_type_ids=False))


def _batches(preset: str, tokenizer) -> list[dict[str, torch.Tensor]]:
    if preset.startswith("vit"):
        return [{"pixel_values": torch.randn(3, 1, 28, 28)}]
    return [_text_batch(tokenizer)]


def test_kurtosis_of_known_distributions() -> None:
    torch.manual_seed(0)
    assert kurtosis(torch.randn(400_000)) == pytest.approx(3.0, abs=0.05)
    assert kurtosis(torch.rand(400_000)) == pytest.approx(1.8, abs=0.02)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_planted_outlier_is_found_exactly(preset: str, tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(preset)
    batches = _batches(preset, tokenizer)
    clean = analyze(model, batches, tokenizer=tokenizer)
    assert clean["outliers"]["total"] == 0 and clean["outliers"]["dims"] == []

    dim, position = 37, 7  # position 7 holds "." in SENTENCE ([CLS] the cat sat on the mat .)
    last = transformer_blocks(model)[-1]

    def plant(module, args, output):
        batch = batches[0]["pixel_values" if preset.startswith("vit") else "input_ids"].shape[0]
        output.view(batch, -1, output.shape[-1])[:, position, dim] += 1000.0
        return output

    handle = last.ffn_output[1].register_forward_hook(plant)
    planted = analyze(model, batches, tokenizer=tokenizer)
    handle.remove()
    outliers = planted["outliers"]
    assert outliers["total"] == 3
    assert outliers["dims"] == [[dim, 3]] and outliers["positions"] == [[position, 3]]
    assert outliers["layers"] == [[last.index, 3]]
    if preset.startswith("vit"):
        assert outliers["tokens"] == [[f"patch {position - 1}", 3]]
    else:
        assert outliers["tokens"] == [[".", 3]] and outliers["delimiter_share"] == 1.0
    assert planted["figure_layer"] == last.index and planted["figure_head"] == dim // 16


def test_metrics_match_direct_computation(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model("bert-tiny").eval()
    batch = dict(tokenizer([SENTENCE, "the dog sat ."], padding=True, return_tensors="pt",
                           return_token_type_ids=False))
    lengths = batch["attention_mask"].sum(1).tolist()
    captured: list[torch.Tensor] = []
    handles = [b.module.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
               for b in transformer_blocks(model)]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    result = analyze(model, [batch], tokenizer=tokenizer)

    inf_norms, kurtoses = [], []
    for x in captured:
        seqs = [x[b, :n].double().flatten() for b, n in enumerate(lengths)]
        inf_norms.append(sum(float(s.abs().max()) for s in seqs) / len(seqs))
        kurtoses.append(sum(float(((s - s.mean()) ** 4).mean() / ((s - s.mean()) ** 2).mean() ** 2)
                            for s in seqs) / len(seqs))
    rows = [r for r in result["per_layer"] if r["tensor"] == "block_out"]
    assert [r["mean_inf_norm"] for r in rows] == pytest.approx(inf_norms, rel=1e-6)
    assert [r["mean_kurtosis"] for r in rows] == pytest.approx(kurtoses, rel=1e-6)
    assert result["max_inf_norm"] == pytest.approx(max(inf_norms), rel=1e-6)
    assert result["avg_kurtosis"] == pytest.approx(sum(kurtoses) / len(kurtoses), rel=1e-6)
    assert result["sequences"] == 2
    assert {r["tensor"] for r in result["per_layer"]} == {
        "attn_out", "ffn_out", "block_out", "ln_in.attention.output.LayerNorm", "ln_in.output.LayerNorm"}


def test_stock_model_is_restored_after_analysis(tokenizer) -> None:
    model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64))
    before = model.config._attn_implementation
    result = analyze(model, [_text_batch(tokenizer)], tokenizer=tokenizer)
    assert result["figure_layer"] == 1
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(getattr(m, "attention_taps", None) is None for m in model.modules())


def test_attention_figures_written(tmp_path, tokenizer) -> None:
    model = create_model("vit-tiny")
    result = analyze(model, _batches("vit-tiny", None), out_dir=tmp_path, layer=0, head=2)
    assert result["figures"] == ["outliers.png", "attention_layer0_head2.png", "vit_patches.png", "sink_share.png",
                                 "mechanism_ratios.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in result["figures"])


def test_bad_inputs_raise_clearly(tokenizer) -> None:
    model = create_model("bert-tiny")
    with pytest.raises(ValueError, match="layer 2 out of range"):
        analyze(model, [_text_batch(tokenizer)], layer=2)
    with pytest.raises(ValueError, match="head 4 out of range"):
        analyze(model, [_text_batch(tokenizer)], head=4)
    with pytest.raises(ValueError, match="no batches"):
        analyze(model, [])
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=32))
    with pytest.raises(ValueError, match="unsupported architecture"):
        analyze(neox, [_text_batch(tokenizer)])


@pytest.fixture(params=["checkpoint", "run"])
def saved_model(request, tmp_path, tokenizer):
    """A tiny BERT as a plain checkpoint directory or as a run directory (model/ + config.yaml), and a text file."""
    root = tmp_path / "saved"
    directory = root / "model" if request.param == "run" else root
    create_model("bert-tiny").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if request.param == "run":
        (root / "config.yaml").write_text("data:\n  seq_len: 12\n")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([SENTENCE] * 6))
    return root, text


def test_cli_writes_metrics(tmp_path, saved_model) -> None:
    directory, text = saved_model
    out = tmp_path / "analysis"
    # one paragraph per sequence: seq_len 16 given here, or 12 from the run's config.yaml
    seq_len = [] if (directory / "config.yaml").exists() else ["--seq-len", "16"]
    code = main(["analyze", str(directory), "--data", str(text), "--batches", "2", "--batch-size", "2",
                 "--layer", "1", *seq_len, "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["max_inf_norm"], float) and isinstance(metrics["avg_kurtosis"], float)
    assert metrics["sequences"] == 4 and len(metrics["per_layer"]) == 2 * 5
    assert set(metrics["outliers"]) >= {"dims", "tokens", "delimiter_share"}
    assert metrics["figures"] == ["outliers.png", f"attention_layer1_head{metrics['figure_head']}.png",
                                  "sink_share.png", "mechanism_ratios.png"]
    assert len(metrics["sink_share_per_head"]) == 2 and len(metrics["sink_share_per_head"][0]) == 4
    assert metrics["gate_closed_share_per_head"] is None and metrics["clipped_zero_share_per_head"] is None
    assert all((out / name).is_file() for name in ["report.md", *metrics["figures"]])


@pytest.mark.parametrize("extra, message", [
    (["--layer", "7"], "layer 7 out of range"),
    (["--batches", "0"], "--batches must be at least 1"),
    (["--data", "/nonexistent.txt"], "no such text file"),
])
def test_cli_bad_arguments(tmp_path, saved_model, capsys, extra, message) -> None:
    directory, text = saved_model
    args = ["analyze", str(directory), "--data", str(text), "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_cli_rejects_non_checkpoint(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err


def test_cli_rejects_unsupported_architecture(tmp_path, capsys) -> None:
    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=32)).save_pretrained(tmp_path / "neox")
    assert main(["analyze", str(tmp_path / "neox"), "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unsupported architecture 'gpt_neox'" in errors[0]


def test_sink_heat_maps_stay_on_a_screen_for_many_heads(tmp_path: Path) -> None:
    """64 heads and three panels made a 7,689 px wide figure (issue 31, item 9): panels are capped and wrap."""
    from PIL import Image

    from quantizable.analysis.report import MAX_FIGURE_WIDTH, sink_heatmaps

    table = [[(layer * 64 + head) % 10 / 10 for head in range(64)] for layer in range(12)]
    result = {"model": "wide", "sink_share_per_head": table, "delimiter_share_per_head": table,
              "gate_closed_share_per_head": table, "null_share_per_head": [[0.0] * 64] * 12, "dormant_share": 0.25}
    with Image.open(sink_heatmaps(result, tmp_path / "wide.png")) as image:
        width, height = image.size
    assert width <= MAX_FIGURE_WIDTH * 90 and height < 3 * width  # three panels, one per row, each readable
