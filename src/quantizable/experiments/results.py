"""The two records a reproduction passes between its stages, typed: what one trained run measured
(:class:`RunMeasurement`, ``measure.json`` plus real INT8, curve and PTQ) and one row of ``results.json``
(:class:`ResultRow`, the seeds of a task x family x method aggregated). Both serialise to the keys the README and
docs tables have always read; a misspelt key is an AttributeError here instead of a silent ``None``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

Stat = dict[str, float]  # {"mean", "std", "n"}
MECHANISM_KEYS = ("sink_share", "value_drain", "residual_peak")  # analyze's no-op numbers, each with a per-layer list


class _Record:
    """Reading and writing a record as the JSON files hold it: a key it does not know is an error (a misspelling,
    or a file written by another version, which the version check re-measures); an ``OPTIONAL`` field that is None
    is left out, as it always was."""

    OPTIONAL: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}


@dataclass(frozen=True)
class RunMeasurement(_Record):
    """One trained run: FP, simulated W8A8 and the bit-width sweep, outlier and no-op metrics (``measure``), then
    real INT8, the curve over snapshots and PTQ baselines added by the runner."""

    version: int
    setup: str
    estimators: dict[str, str]
    metric: str
    fp: float
    w8a8: dict[str, Any]  # the simulator's summary: mean, std, per_seed
    sites: int
    bits_sweep: dict[str, list[float]]  # per bit width, the per-seed scores
    max_inf_norm: float
    avg_kurtosis: float
    per_layer_inf_norm: list[float]
    analysis_dir: str
    figures: list[str] = field(default_factory=list)  # analyze's figure files, in analysis_dir
    sink_share: float | None = None
    value_drain: float | None = None
    residual_peak: float | None = None
    sink_share_per_layer: list[float] | None = None
    value_drain_per_layer: list[float] | None = None
    residual_peak_per_layer: list[float] | None = None
    dormant_share: float | None = None
    value_drain_min: float | None = None
    alive_share: float | None = None  # kinds with exact zeros (clipped softmax, softpick)
    alive_share_per_layer: list[float] | None = None
    dead_row_share_per_layer: list[float] | None = None
    dead_layers: list[int] | None = None
    liveness_at_init: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None  # backcopy: copy accuracy and bigram excess, FP and per seed
    bos_share_copy_per_layer: list[float] | None = None
    bos_share_other_per_layer: list[float] | None = None
    # ViT registers (model.registers): max inf-norm on them alone, left out of max_inf_norm; None on every run
    # measured before registers existed, so no MEASURE_VERSION bump
    register_max_inf_norm: float | None = None
    # added by the runner, not by measure()
    int8: dict[str, Any] | None = None
    run_dir: str | None = None
    seed: int | None = None
    curve: list[dict[str, Any]] | None = None
    ptq: dict[str, Any] | None = None

    OPTIONAL = frozenset({"scores", "bos_share_copy_per_layer", "bos_share_other_per_layer",
                          "register_max_inf_norm", "int8", "run_dir", "seed", "curve", "ptq"})



@dataclass(frozen=True)
class ResultRow(_Record):
    """One row of ``results.json``: mean ± std over training seeds (FP, outliers, mechanism) and over training x
    calibration seeds (W8A8, the sweep, PTQ) of one task x family x method."""

    task: str
    family: str
    method: str
    metric: str
    setup: str
    estimators: dict[str, str]
    fp: Stat
    w8a8: Stat
    int8: Stat
    max_inf_norm: Stat
    avg_kurtosis: Stat
    per_layer_inf_norm: list[float] | None
    sink_share: Stat | None
    value_drain: Stat | None
    residual_peak: Stat | None
    dormant_share: Stat | None
    value_drain_min: Stat | None
    sink_share_per_layer: list[float] | None
    value_drain_per_layer: list[float] | None
    residual_peak_per_layer: list[float] | None
    bits_sweep: dict[str, float]
    bits_sweep_std: dict[str, float]
    train_seeds: list[int]
    calib_seeds: list[int]
    runs: list[str]
    analysis_dir: str
    figures: list[str] = field(default_factory=list)  # the first run's analysis figures, in analysis_dir
    alive_share: Stat | None = None
    alive_share_per_layer: list[float] | None = None
    dead_layers: dict[str, list[int]] | None = None
    dead_layers_at_init: dict[str, list[int]] | None = None
    ptq: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None
    bos_share_copy_per_layer: list[float] | None = None
    bos_share_copy: Stat | None = None
    bos_share_other_per_layer: list[float] | None = None
    bos_share_other: Stat | None = None
    curve: list[dict[str, Any]] | None = None
    floor: dict[str, Any] | None = None
    register_max_inf_norm: Stat | None = None

    OPTIONAL = frozenset({"alive_share", "alive_share_per_layer", "dead_layers", "dead_layers_at_init", "ptq",
                          "scores", "bos_share_copy_per_layer", "bos_share_copy", "bos_share_other_per_layer",
                          "bos_share_other", "curve", "floor", "register_max_inf_norm"})

