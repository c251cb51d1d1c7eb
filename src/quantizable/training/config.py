"""Training configuration: nested dataclasses read from YAML presets (or a YAML file) plus ``key.sub=value`` overrides.

Presets live in ``quantizable/presets/<name>.yaml`` and only list what differs from the dataclass defaults. The
resolved configuration is written to ``RUN_DIR/config.yaml`` and reads back to an equal object.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantizable.attention.spec import AttentionSpec
from quantizable.data.backcopy import is_backcopy, parse_source
from quantizable.io import write_text_atomic

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
SCHEDULES = ("linear", "cosine")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
TOKENIZERS = ("wordpiece", "bpe")
NORMS = ("family", "single_scale")
OPTIMIZERS = ("adamw", "muon")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """A model preset of :data:`quantizable.models.MODEL_PRESETS` and config overrides (dropout, sizes, ...).

    ``norm: single_scale`` gives every norm one scalar gain and ``embedding_projection`` adds a learnable d x d
    matrix after the input embeddings (Outlier-Safe Pre-Training); ``registers: N`` appends N learned tokens to a
    ViT's patches that the head never sees (Darcet et al. 2024). All are ``models.structure``'s and are written into
    the model's config, so the saved model rebuilds them.
    """

    preset: str = "bert-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    norm: str = "family"
    embedding_projection: bool = False
    registers: int = 0

    def __post_init__(self) -> None:
        _require(self.norm in NORMS, f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        _require(self.registers >= 0, f"model.registers must be >= 0, got {self.registers}")

    def structure(self) -> dict[str, Any]:
        """The model-config settings these fields become (only those that differ from the family's model)."""
        settings = {"single_scale_norm": self.norm == "single_scale", "embedding_projection": self.embedding_projection,
                    "registers": self.registers}
        return {key: value for key, value in settings.items() if value}


@dataclass
class DataConfig:
    """Text data: tokenizer (``None``: the family's default, WordPiece for MLM and BPE for CLM), sequence length,
    an optional data source instead of the default corpus (a file, directory, ``datasets`` name, or the synthetic
    ``backcopy[:key=value,...]`` task of :mod:`quantizable.data.backcopy`) and the MLM masking probability."""

    tokenizer: str | None = None
    seq_len: int = 128
    source: str | None = None
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        _require(self.tokenizer is None or self.tokenizer in TOKENIZERS,
                 f"data.tokenizer must be one of {', '.join(TOKENIZERS)} or null, got {self.tokenizer!r}")
        _require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _require(0.0 < self.mlm_probability < 1.0,
                 f"data.mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        if is_backcopy(self.source):
            parse_source(self.source)  # a bad task parameter fails here, before any training


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear or cosine decay to ``final_lr_fraction * lr`` (paper appendix C).

    ``name: muon`` trains the transformer blocks' weight matrices with Muon and the rest with AdamW
    (``training.optim.make_optimizer``), at the same ``lr`` and ``weight_decay``.

    ``decay_layernorm_gamma`` also applies weight decay to LayerNorm weights (paper B.3); biases are never decayed.
    ``gate_lr_scale`` multiplies the learning rate of attention gates: when fine-tuning a pretrained model the gates
    are the only new parameters, and at the small learning rate that suits the pretrained weights they barely move.
    ``gamma_warmup_steps`` grows clipped softmax's gamma linearly from 0 to its configured value over that many
    steps (attention starts as plain softmax); measured on bert-cpu it does not keep layers alive on its own
    (docs/reproduce.md, "Clipped softmax at initialisation").
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"
    final_lr_fraction: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    decay_layernorm_gamma: bool = False
    gate_lr_scale: float = 1.0
    gamma_warmup_steps: int = 0
    fused: bool = True  # fused AdamW where every parameter allows it (false: torch's default implementation)

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.schedule in SCHEDULES,
                 f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(0.0 <= self.final_lr_fraction <= 1.0,
                 f"optim.final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}")
        _require(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.gamma_warmup_steps >= 0, f"optim.gamma_warmup_steps must be >= 0, got {self.gamma_warmup_steps}")
        _require(self.gate_lr_scale > 0, f"optim.gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        _require(self.grad_clip is None or self.grad_clip > 0,
                 f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class RunConfig:
    """Length, batch (per process, per micro-step), seed and how often to evaluate, checkpoint, log, measure
    outliers and keep a weight snapshot (0 disables). ``mixed_precision: auto`` uses bf16 (else fp16) on a GPU and
    fp32 on CPU. ``compile`` runs the model through torch.compile (accelerate's dynamo plugin, inductor): the same
    losses, faster steps on GPUs once compiled. ``loader_workers`` decodes training batches in that many processes
    (an image folder at 224 px keeps a GPU waiting otherwise); the batches are the same as with 0."""

    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 20
    checkpoint_every: int = 0
    log_every: int = 10
    outlier_every: int = 0
    snapshot_every: int = 0  # keep the weights every N steps in snapshots/step_N (quality-vs-step curves)
    mixed_precision: str = "auto"
    compile: bool = False
    loader_workers: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"run.steps must be >= 0, got {self.steps}")
        _require(self.batch_size >= 1, f"run.batch_size must be >= 1, got {self.batch_size}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "log_every", "outlier_every", "snapshot_every",
                     "loader_workers"):
            _require(getattr(self, name) >= 0, f"run.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.mixed_precision in MIXED_PRECISION,
                 f"run.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")


@dataclass
class QATConfig:
    """Quantization-aware training (``training.qat``): ``setting`` ``w8a8`` (or ``w8a4``, ...) fine-tunes through
    the simulator's quantizers, activation ranges calibrated on ``calibration_batches`` validation batches at the
    start; null trains in floating point."""

    setting: str | None = None
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        _require(self.setting is None or re.fullmatch(r"w\d+a\d+", self.setting.lower()) is not None,
                 f"qat.setting must look like w8a8 (weight and activation bits) or be null, got {self.setting!r}")
        _require(self.calibration_batches >= 1,
                 f"qat.calibration_batches must be >= 1, got {self.calibration_batches}")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``attention`` is the model's :class:`AttentionSpec`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    qat: QATConfig = field(default_factory=QATConfig)

    def __post_init__(self) -> None:
        # a 0-step run only saves its initial model; any other must get through its warm-up, or the learning rate
        # never reaches optim.lr (the schedule would silently be a fraction of the configured one)
        _require(self.run.steps == 0 or self.optim.warmup_steps <= self.run.steps,
                 f"optim.warmup_steps={self.optim.warmup_steps} exceeds run.steps={self.run.steps}: the learning rate "
                 f"would never reach optim.lr; use optim.warmup_steps <= {self.run.steps}")
        _require(self.optim.gamma_warmup_steps == 0 or self.attention.kind == "clipped_softmax",
                 f"optim.gamma_warmup_steps={self.optim.gamma_warmup_steps} only applies to attention.kind "
                 f"clipped_softmax, not {self.attention.kind!r}")
        _require(self.run.steps == 0 or self.optim.gamma_warmup_steps <= self.run.steps,
                 f"optim.gamma_warmup_steps={self.optim.gamma_warmup_steps} exceeds run.steps={self.run.steps}: "
                 f"gamma would never reach its configured value; use optim.gamma_warmup_steps <= {self.run.steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = copy.deepcopy(data)
        attention = data.get("attention") or {}
        seq_len = (data.get("data") or {}).get("seq_len", DataConfig.seq_len)
        if attention.get("alpha") is not None and attention.get("seq_len") is None:
            attention["seq_len"] = seq_len  # gamma = -alpha / T uses the training length
        return _build(cls, data, "")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "TrainConfig":
        """The resolved configuration a run was trained with (``RUN_DIR/config.yaml``): the one way to read it."""
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise ValueError(f"{run_dir} is not a training run: it has no config.yaml")
        return cls.from_dict(_yaml_number(_read_yaml(path)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass instance from a (partial) dict, naming the valid keys when one is unknown."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    if cls is AttentionSpec:
        _check_keys(cls, data, prefix)
        return AttentionSpec.from_dict(data)
    _check_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _check_keys(cls: type, data: dict, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"valid keys here: {', '.join(prefix + k for k in known)}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a scalar against its annotation (ints are accepted for floats)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return value
    raise ValueError(f"{name} has the wrong type: got {value!r}, expected {hint}")


def list_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
    elif (PRESET_DIR / f"{source}.yaml").is_file():
        path = PRESET_DIR / f"{source}.yaml"
    else:
        raise ValueError(f"unknown training preset {str(source)!r}; presets: {', '.join(list_presets())} "
                         "(or give a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    if data is None:
        raise ValueError(f"{path} is empty; a config needs at least model.preset (or use a training preset: "
                         f"{', '.join(list_presets())})")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line, with where it is (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` (value typed by YAML: ``3`` int, ``1e-4`` float, ``null``, ``[0.9, 0.95]``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {assignment!r} must look like key.sub=value")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {assignment!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    target, cls = data, TrainConfig
    for depth, part in enumerate(parts):
        if cls is not None:  # inside dataclasses keys are checked; free-form dicts (model.overrides) take any key
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                prefix = ".".join(parts[:depth])
                raise ValueError(f"unknown config key {'.'.join(parts[:depth + 1])!r}; valid keys: "
                                 + ", ".join(f"{prefix}.{n}" if prefix else n for n in names))
            hint = typing.get_type_hints(cls)[part]
            cls = hint if dataclasses.is_dataclass(hint) else None
        if depth == len(parts) - 1:
            break
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"cannot set {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
    target[parts[-1]] = value


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; treat such strings as the numbers they spell."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _yaml_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_number(v) for v in value]
    return value


def load_config(source: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name (``bert-tiny``, ``opt-125m``, ...) or a YAML path, with overrides."""
    data = _read_yaml(source)
    for assignment in overrides:
        apply_override(data, assignment)
    model = data.get("model")
    if not (isinstance(model, dict) and model.get("preset")):
        raise ValueError(f"{source} sets no model.preset (one of the model presets, e.g. opt-tiny; or use a training "
                         f"preset: {', '.join(list_presets())})")
    return TrainConfig.from_dict(_yaml_number(data))
