"""Loading a finished model for a command: a damaged weights file is one clear error instead of a safetensors
traceback, NaN/Inf weights are refused instead of analysed, and a run's weights must match the digest its trainer
recorded in ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _run_summary(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """``summary.json`` of the run that ``path`` (a run directory or its ``model/``) belongs to, if any."""
    for candidate in (path / "summary.json", path.parent / "summary.json" if path.name == "model" else None):
        if candidate is not None and candidate.is_file():
            try:
                return candidate, json.loads(candidate.read_text())
            except ValueError:
                raise ValueError(f"{candidate} is damaged (not valid JSON)") from None
    return None


def check_finite(model: torch.nn.Module, where: str | Path) -> None:
    """Refuse weights holding NaN or Inf: every number computed from them would be meaningless."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{where} holds non-finite weights (NaN or Inf in {len(bad)} tensor(s), first {bad[0]}); "
                         f"the file is damaged or the training diverged")


def load_checked_model(path: str | Path, new_weights: bool = False) -> Any:
    """:func:`quantizable.models.load_model` plus the checks above; what every command that reads a model uses
    (``new_weights``: a missing task head may be initialised, for fine-tuning)."""
    from safetensors import SafetensorError

    from quantizable.models import load_model
    from quantizable.training.checkpoint import weight_digest

    path = Path(path)
    try:
        model = load_model(path, new_weights=new_weights)
    except SafetensorError as error:
        raise ValueError(f"the weights of {path} are damaged (truncated or not a safetensors file: {error}); "
                         f"restore the file or train again") from None
    check_finite(model, path)
    found = _run_summary(path)
    if found is not None and found[1].get("weight_digests"):
        summary_file, summary = found
        if weight_digest(model.state_dict()) != summary["weight_digests"][0]:
            raise ValueError(f"the weights of {path} do not match the digest recorded in {summary_file} when "
                             f"training finished (changed or damaged since); restore the file or train again")
    return model
