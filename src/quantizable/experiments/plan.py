"""What a reproduction trains: its tasks (families, preset, per-scale overrides, attention settings per method) and
its scales (seeds, calibration and evaluation sizes), and the training configuration of one run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from quantizable.training.config import TrainConfig, load_config

METHODS = ("vanilla", "clipped_softmax", "gated_attention")  # the paper's trio; any attention kind is accepted
BIT_WIDTHS = ("W8A8", "W8A6", "W8A4", "W6A8", "W4A8")  # the sensitivity curve: activation bits, then weight bits
# the long study's kinds: the paper's two, the other fixes that give a head a place to put nothing, and vanilla
LONG_METHODS = ("vanilla", "clipped_softmax", "gated_attention", "softmax_plus_one", "sink_token", "key_bias")

# The paper's settings per family and method (BERT table 5, OPT table 6, ViT table 7).
PAPER_ATTENTION: dict[str, dict[str, dict[str, Any]]] = {
    "bert": {"clipped_softmax": {"gamma": -0.025}, "gated_attention": {"gate_type": "linear", "pi_init": 0.25}},
    "opt": {"clipped_softmax": {"alpha": 12}, "gated_attention": {"gate_type": "linear", "pi_init": 0.25}},
    "vit": {"clipped_softmax": {"gamma": -0.003}, "gated_attention": {"gate_type": "linear", "pi_init": 0.25}},
}
# The CPU presets' settings: the paper's, except that clipped-softmax BERT initialises q/k with std 1/sqrt(d_model).
# With the family's N(0, 0.02) at d = 128 every entry of every row is below gamma = -0.025's threshold at step 0,
# so attention is exactly zero with exactly zero gradient for the whole run (docs/reproduce.md, "Clipped softmax
# at initialisation": 300-step probe, batch 16: perplexity 628 without attention, 618 with LeCun q/k, 5-6% of
# entries alive in every layer; LeCun q/k changes vanilla by 634 -> 630). OPT keeps the family init: alpha 12 at
# T = 128 starts as partly dead as the paper's OPT-125m does (0.8% vs 0.7% of entries alive, 90% vs 91% all-zero
# rows), and every layer revives from its early positions.
CPU_ATTENTION: dict[str, dict[str, dict[str, Any]]] = {
    **PAPER_ATTENTION,
    "bert": {**PAPER_ATTENTION["bert"], "clipped_softmax": {"gamma": -0.025, "qk_init": "lecun"}},
}


@dataclass(frozen=True)
class Task:
    """What a reproduction trains: its families, their training preset, what each scale changes and the
    attention settings per family and method (methods not listed use the kind's defaults)."""

    name: str
    families: tuple[str, ...]
    preset: str  # "{family}" and "{suffix}" (the scale's preset suffix) are filled in
    overrides: dict[str, tuple[str, ...]]  # per scale name
    attention: dict[str, dict[str, dict[str, Any]]]
    scale_families: dict[str, tuple[str, ...]] = field(default_factory=dict)  # default subset per scale
    scale_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # default methods per scale
    floors: dict[str, tuple[str, float]] = field(default_factory=dict)  # family -> (metric, minimum)

    def method_settings(self, family: str, method: str) -> dict[str, Any]:
        return {"kind": method, **self.attention.get(family, {}).get(method, {})}


TASKS: dict[str, Task] = {
    # Bigram-Backcopy (quantizable.data.backcopy): the no-op head in its purest form, learnt in a few hundred steps.
    # Clipped softmax with alpha = 4 (the paper's recommended 2..4, gamma = -4/64): a uniform row is all zeros.
    "backcopy": Task("backcopy", ("opt",), "{family}-backcopy", {
        "full": ("run.steps=3000", "run.checkpoint_every=500", "run.outlier_every=100"),
        "quick": ("run.steps=300", "run.checkpoint_every=100", "run.outlier_every=50"),
        "tiny": ("run.steps=12", "optim.warmup_steps=2", "run.checkpoint_every=6", "run.outlier_every=6",
                 "data.source=backcopy:train=256,validation=64"),
        # the long study (issue 28): the preset's lr held constant, batch 8 so twelve runs fit in about an hour on
        # 2 cores (45 ms a step on one core). A 20,000-step probe at batch 32 broke gated attention's W8A8 (+45%,
        # +50% over two seeds; ../shared/reference/long-backcopy-probe.md); the same probe at batch 8 grows the
        # largest activation faster (gated 1,776 at 8,000 steps vs 1,235 at batch 32) and breaks it by 8,000
        # steps (W8A8 3.40 -> 7.91; vanilla 3.37 -> 3.38), so 8,000 steps with a snapshot every 800
        "long": ("run.steps=8000", "run.batch_size=8", "optim.final_lr_fraction=1.0", "run.snapshot_every=800",
                 "run.checkpoint_every=800", "run.outlier_every=400", "run.log_every=100"),
        "long-tiny": ("run.steps=12", "optim.warmup_steps=2", "optim.final_lr_fraction=1.0", "run.snapshot_every=6",
                      "run.checkpoint_every=6", "run.outlier_every=6", "data.source=backcopy:train=256,validation=64"),
    }, {"opt": {"clipped_softmax": {"alpha": 4}, "gated_attention": {"gate_type": "linear", "pi_init": 0.25}}},
        scale_methods={scale: LONG_METHODS for scale in ("long", "long-tiny")},
        floors={"opt": ("copy_accuracy", 0.9)}),
    # The paper's table 2 on the embedded corpus and Fashion-MNIST (the CPU preset recipes).
    "pretrain": Task("pretrain", ("bert", "opt", "vit"), "{family}-{suffix}", {
        # shortened so 18 trainings fit in about an hour on 2 cores
        "full": ("run.steps=600", "run.batch_size=16", "optim.warmup_steps=60", "run.eval_every=0",
                 "run.checkpoint_every=200", "run.outlier_every=100"),
        # the quick-start job: ViT only, long enough to learn (72% after 300 steps; BERT and OPT need far longer to
        # leave the unigram level, see docs/reproduce.md, so the quick job shows the causal LM on backcopy instead)
        "quick": ("run.steps=300", "run.batch_size=32", "data.seq_len=64", "optim.warmup_steps=30",
                  "run.eval_every=0", "run.checkpoint_every=100", "run.outlier_every=50"),
        "tiny": ("run.steps=12", "optim.warmup_steps=2", "run.checkpoint_every=6"),
    }, CPU_ATTENTION, scale_families={"quick": ("vit",)}, floors={"vit": ("accuracy", 65.0)}),
}
# The families some task trains (a subset of quantizable.models.FAMILIES, which every other verb accepts).
TRAINED_FAMILIES = tuple(dict.fromkeys(f for task in TASKS.values() for f in task.families))


@dataclass(frozen=True)
class Scale:
    """How big a reproduction is: training preset suffix, seeds, calibration and evaluation sizes (what each task
    trains at a scale is in ``Task.overrides``)."""

    name: str
    preset_suffix: str
    train_seeds: tuple[int, ...]
    calib_seeds: tuple[int, ...]
    calib_batches: int
    eval_batches: int
    analysis_batches: int
    curve: bool = False  # also score every weight snapshot (experiments.curves): quality over training


SCALES: dict[str, Scale] = {
    "full": Scale("full", "cpu", (0, 1), (0, 1, 2), 16, 16, 8),
    "quick": Scale("quick", "cpu", (0, 1), (0, 1), 4, 4, 2),  # the quick-start job, under ten minutes
    "tiny": Scale("tiny", "tiny", (0,), (0,), 2, 2, 2),  # the CI smoke form
    # the long run (issue 28): backcopy only, a constant learning rate, a snapshot every tenth of the run
    "long": Scale("long", "cpu", (0, 1), (0, 1), 8, 16, 4, curve=True),
    "long-tiny": Scale("long-tiny", "tiny", (0, 1), (0,), 2, 2, 2, curve=True),  # its CI smoke form
}


def run_config(family: str, method: str, seed: int, scale: Scale, overrides: tuple[str, ...] = (),
               task: str = "pretrain") -> TrainConfig:
    """The training configuration of one run: task preset, scale, method, the user's ``--set`` overrides (after the
    method, so ``attention.pi_init=0.5`` refines it), seed."""
    spec = TASKS[task]
    attention = spec.method_settings(family, method)
    settings = [*spec.overrides[scale.name], f"attention={json.dumps(attention)}", *overrides, f"run.seed={seed}"]
    return load_config(spec.preset.format(family=family, suffix=scale.preset_suffix), settings)


def fingerprint(config: TrainConfig, scale: Scale) -> str:
    """A short hash naming a run's directory: the settings that differ from ``TrainConfig()``'s and the scale's
    measurement sizes. Only the differences, so a new config field with a default leaves finished runs reusable."""
    payload = json.dumps({"config": _changed(config.to_dict(), TrainConfig().to_dict()), "calib": scale.calib_seeds,
                          "calib_batches": scale.calib_batches, "eval_batches": scale.eval_batches},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of a nested settings dict that differ from ``defaults`` (nested sections compared per key)."""
    changed = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and default.keys() <= value.keys():
            value = _changed(value, default)
            if value:
                changed[key] = value
        elif value != default or key not in defaults:
            changed[key] = value
    return changed
