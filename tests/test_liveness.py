"""Clipped softmax at initialisation (issue 27): detecting dead attention, q/k init that keeps it alive, gamma
warm-up. The reference for "alive" is the paper's formula: an entry is non-zero iff its softmax probability is
above -gamma/(zeta-gamma), and a zero entry passes no gradient (torch's own clamp backward)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quantizable.analysis.mechanism import MechanismStats, allowed_pairs, dead_row_counts
from quantizable.attention import AttentionSpec, clipped_softmax
from quantizable.models import create_model, load_model
from quantizable.models.modeling import attention_modules, scale_clipping
from quantizable.training import load_config, train

PAPER_BERT = {"kind": "clipped_softmax", "gamma": -0.025}


def test_alive_and_dead_row_shares_on_hand_built_scores() -> None:
    # one batch, one head, 3 valid tokens of 4 (the last is padding); rows hand-picked so that with gamma = -0.6
    # (threshold 0.375) row 0 keeps 1 of 3 entries, row 1 (uniform, 1/3 each) none, row 2 two (0.47 each)
    gamma = -0.6
    scores = torch.tensor([[[[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 9.0]]]])
    scores = torch.cat([scores, torch.zeros(1, 1, 1, 4)], dim=2)  # the padding query's row
    valid = torch.tensor([[True, True, True, False]])
    masked = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = clipped_softmax(masked, gamma)
    threshold = -gamma / (1 - gamma)
    plain = torch.softmax(masked, -1)
    assert torch.equal(probs > 0, plain > threshold)  # the paper's formula: alive iff above the threshold
    allowed = allowed_pairs(valid, causal=False)
    dead, rows = dead_row_counts(probs, allowed)
    assert rows.item() == 3 and dead.tolist() == [1]
    stats = MechanismStats(1)
    stats.add_attention(0, probs, valid, None, causal=False, zeroing=True)
    stats.add_value_norms(0, torch.ones(1, 4, 1), valid)
    stats.add_hidden(0, torch.randn(1, 4, 8), valid)
    summary = stats.summary()
    assert summary["alive_share_per_layer"] == pytest.approx([(1 + 0 + 2) / 9])
    assert summary["dead_row_share_per_layer"] == pytest.approx([1 / 3])
    assert summary["dead_layers"] == []
    # every row dead: the layer is listed
    stats = MechanismStats(1)
    stats.add_attention(0, torch.zeros_like(probs), valid, None, causal=False, zeroing=True)
    stats.add_value_norms(0, torch.ones(1, 4, 1), valid)
    stats.add_hidden(0, torch.randn(1, 4, 8), valid)
    summary = stats.summary()
    assert summary["dead_layers"] == [0] and summary["alive_share"] == 0.0
    assert summary["dead_row_share_per_layer"] == [1.0]


def test_causal_rows_count_only_their_visible_keys() -> None:
    # a causal row with one visible key always has probability 1 there: never dead, however large |gamma|
    probs = clipped_softmax(torch.zeros(1, 1, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(),
                                                               float("-inf")), gamma=-0.6)
    dead, rows = dead_row_counts(probs, allowed_pairs(torch.ones(1, 3, dtype=torch.bool), causal=True))
    # threshold 0.375: row 0 (p = 1) and row 1 (1/2 each) stay, row 2 (1/3 each) is all zero
    assert rows.item() == 3 and dead.tolist() == [1]


@pytest.mark.parametrize("how, expected_std", [("lecun", lambda d: d ** -0.5),
                                               ("torch_linear", lambda d: (3 * d) ** -0.5)])
@pytest.mark.parametrize("preset", ["bert-small", "opt-small", "gpt2-tiny"])
def test_qk_init_sets_the_query_key_std_and_nothing_else(preset: str, how: str, expected_std) -> None:
    torch.manual_seed(0)
    family_model = create_model(preset)
    torch.manual_seed(0)
    model = create_model(preset, AttentionSpec(qk_init=how))
    d = model.config.hidden_size
    changed = {n for (n, a), b in zip(family_model.named_parameters(), model.parameters()) if not torch.equal(a, b)}
    for module in attention_modules(model):
        if preset.startswith("gpt2"):
            weight = module.c_attn.weight  # Conv1D (in, out): q and k are the first 2d output columns
            assert float(weight[:, : 2 * d].detach().std()) == pytest.approx(expected_std(d), rel=0.1)
            assert float(weight[:, 2 * d:].detach().std()) == pytest.approx(0.02, rel=0.1)  # v keeps the family init
        else:
            q, k = (module.get_submodule(n) for n in (("query", "key") if preset.startswith("bert")
                                                       else ("q_proj", "k_proj")))
            for layer in (q, k):
                assert float(layer.weight.detach().std()) == pytest.approx(expected_std(d), rel=0.1)
    # only query/key projections changed
    assert changed and all(any(k in n for k in ("query", "key", "q_proj", "k_proj", "c_attn")) for n in changed)


def test_qk_init_survives_save_and_load(tmp_path: Path) -> None:
    model = create_model("bert-tiny", AttentionSpec(qk_init="lecun", **PAPER_BERT))
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # the init at load time does not overwrite the saved weights
    assert loaded.attention_spec.qk_init == "lecun"
    with pytest.raises(ValueError, match="qk_init must be one of family, lecun, torch_linear"):
        AttentionSpec(qk_init="xavier")


def test_gamma_warm_up_scales_the_working_spec_only() -> None:
    model = create_model("bert-tiny", AttentionSpec(kind="clipped_softmax", gamma=-0.1, zeta=1.1))
    scale_clipping(model, 0.25)
    spec = attention_modules(model)[0].attention_spec
    assert spec.resolved_gamma() == pytest.approx(-0.025) and spec.zeta == pytest.approx(1.025)
    assert model.config.attention_spec["gamma"] == -0.1  # what is saved stays the configured value
    scale_clipping(model, 1.0)
    assert attention_modules(model)[0].attention_spec == model.attention_spec
    with pytest.raises(ValueError, match="only applies to attention.kind clipped_softmax"):
        load_config("bert-tiny", ["optim.gamma_warmup_steps=5"])
    with pytest.raises(ValueError, match="exceeds run.steps"):
        load_config("bert-tiny", [f"attention={json.dumps(PAPER_BERT)}", "optim.gamma_warmup_steps=500"])


def _bert_cpu(attention: dict, steps: int, *extra: str):
    return load_config("bert-cpu", [f"attention={json.dumps(attention)}", f"run.steps={steps}", "run.batch_size=8",
                                    f"optim.warmup_steps={min(steps, 10)}", "run.eval_every=0", "run.eval_batches=1",
                                    "run.checkpoint_every=0", *extra])


def _step0(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_step0_warning_names_dead_layers_of_the_bert_cpu_preset(tmp_path: Path, capsys) -> None:
    """bert-cpu with the paper's BERT gamma and the family init is dead in every layer; LeCun q/k init is not."""
    train(_bert_cpu(PAPER_BERT, 1), tmp_path / "dead", progress=False)
    out = capsys.readouterr().out
    assert "warning: attention is dead at step 0 in layer(s) 0, 1, 2, 3 of 4" in out
    assert "attention.qk_init=lecun" in out
    assert _step0(tmp_path / "dead")["dead_layers"] == [0, 1, 2, 3]
    summary = json.loads((tmp_path / "dead" / "summary.json").read_text())
    assert summary["liveness_at_init"]["alive_share_per_layer"] == [0.0] * 4
    from quantizable.cli.main import main as cli_main

    assert cli_main(["analyze", str(tmp_path / "dead"), "--batches", "1", "--out", str(tmp_path / "analysis")]) == 0
    assert "dead (no gradient into q, k, v): layer(s) 0, 1, 2, 3" in capsys.readouterr().out
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "| dead layers (no entry above zero: no gradient into q, k, v) | 0, 1, 2, 3 |" in report

    train(_bert_cpu({**PAPER_BERT, "qk_init": "lecun"}, 1), tmp_path / "alive", progress=False)
    assert "warning: attention is dead" not in capsys.readouterr().out
    record = _step0(tmp_path / "alive")
    assert record["dead_layers"] == [] and min(record["alive_share_per_layer"]) > 0.01


def _query_key_grads(model) -> list[float]:
    return [p.grad.norm().item() for n, p in model.named_parameters() if n.endswith(("query.weight", "key.weight"))]


@pytest.mark.slow
def test_fixed_bert_cpu_stays_alive_and_learns_after_40_steps(tmp_path: Path) -> None:
    from quantizable import data
    from quantizable.data.tasks import task_data
    from quantizable.tasks import Task

    config = _bert_cpu({**PAPER_BERT, "qk_init": "lecun"}, 40, "run.outlier_every=20")
    train(config, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["alive_share"] > 0 for r in log if "alive_share" in r] == [True, True]
    model = load_model(tmp_path)
    tokenizer = data.checkpoint_tokenizer(tmp_path)
    sets = task_data(config, Task.MLM, tokenizer)
    batch = next(iter(sets.validation_loader()))
    model.train()
    model(**batch).loss.backward()
    grads = _query_key_grads(model)
    assert len(grads) == 8 and min(grads) > 1e-6
    # every layer's attention output is non-zero
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: outputs.append(o[0])) for m in attention_modules(model)]
    with torch.no_grad():
        model.eval()(**{k: v for k, v in batch.items() if k != "labels"})
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 4 and all(float(o.abs().amax()) > 0 for o in outputs)


def test_dead_model_gets_exactly_zero_query_key_gradient() -> None:
    """The defect the warning exists for, checked with torch's own autograd: bert-cpu's clipped softmax at the
    paper's gamma passes no gradient into q and k at step 0."""
    torch.manual_seed(0)
    model = create_model("bert-small", AttentionSpec(**PAPER_BERT), vocab_size=1000).train()
    ids = torch.randint(5, 1000, (4, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    assert max(_query_key_grads(model)) == 0.0
    threshold = AttentionSpec(**PAPER_BERT).clip_threshold()
    assert threshold == pytest.approx(0.025 / 1.025) and 1 / 128 < threshold  # a uniform row is below it
    assert math.isclose(-AttentionSpec(**PAPER_BERT).resolved_gamma() * 128, 3.2)
