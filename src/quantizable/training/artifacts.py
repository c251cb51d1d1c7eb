"""The model directories a run leaves: ``model/`` when it finishes and ``snapshots/step_N`` every
``run.snapshot_every`` steps, each loadable by ``from_pretrained`` and transformers' pipelines."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from quantizable.data.images import image_processor
from quantizable.data.text import prepend_bos_when_encoding
from quantizable.remote_code import write_remote_image_processor
from quantizable.tasks import Task

def save_model(model: PreTrainedModel, state: dict[str, torch.Tensor], tokenizer: Any, task: str, dest: Path) -> None:
    """``save_pretrained`` plus what loading and transformers' pipelines need beside the weights, written under a
    temporary name and renamed, so a directory that exists is complete."""
    staging = dest.with_name(f".tmp_{dest.name}")
    if staging.exists():
        shutil.rmtree(staging)
    # run.compile: the gathered state of the compiled wrapper names every weight "_orig_mod.<name>"
    state = {name.removeprefix("_orig_mod."): tensor for name, tensor in state.items()}
    # with the modeling code beside it (QuantizableMixin.save_pretrained): loads where we are not installed
    model.save_pretrained(staging, state_dict=state, safe_serialization=True)
    # the tokenizer (a causal LM's starting every input with BOS, as training did) or the image processor
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
        if task == Task.CLM:
            prepend_bos_when_encoding(staging, tokenizer)
    else:
        image_processor(model.config).save_pretrained(staging)
        write_remote_image_processor(staging)
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """The weight snapshots of a run (``run.snapshot_every``), oldest first; each loads like ``model/``."""
    found = [(int(path.name.removeprefix("step_")), path) for path in (run_dir / "snapshots").glob("step_*")
             if path.name.removeprefix("step_").isdigit()]
    return sorted(found)
