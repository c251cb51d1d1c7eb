"""Checkpoint I/O of a run directory: atomic ``checkpoints/step_N`` written by ``accelerator.save_state`` with the
SHA-256 of every file in ``trainer_state.json``, verified before a resume loads anything, and the metrics log cut
back to the checkpoint's step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantizable.io import write_text_atomic

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not match the digests recorded when it was written (truncated or damaged)."""


def weight_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes, to check that processes hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a checkpoint is complete once renamed from its temporary name)."""
    found = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        if (path / STATE_FILE).is_file() and path.name.removeprefix("step_").isdigit():
            found.append((int(path.name.removeprefix("step_")), path))
    return sorted(found)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite: a finished run or one with checkpoints needs ``resume``."""
    if resume:
        return
    if (run_dir / "summary.json").exists() or (run_dir / "model").exists():
        raise ValueError(f"{run_dir} holds a finished run; choose another --out or pass --resume")
    if checkpoints(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log reads like one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file a checkpoint holds, so a truncated or damaged one is caught before it is loaded."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file() and path.name != STATE_FILE}


def verified_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint whose files match the digests recorded when it was written."""
    state = json.loads((path / STATE_FILE).read_text())
    if "files" not in state or "scheduler" not in state:
        raise CorruptCheckpointError(f"checkpoint {path} was written by an older version of quantizable (no file "
                                     f"digests or scheduler state); delete {path} to restart the run from scratch")
    actual = file_digests(path)
    expected = state["files"]
    damaged = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if damaged:
        raise CorruptCheckpointError(f"checkpoint {path} is damaged ({', '.join(damaged)} truncated, changed or "
                                     f"missing); delete {path} to restart the run from scratch")
    return state


class _TiedWeightsNotice(logging.Filter):
    """accelerate warns at every checkpoint that it left out the tied copy of the embeddings (OPT's ``lm_head``,
    BERT's MLM decoder); loading ties them again, which the kill-and-resume test checks bit for bit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict[str, Any]) -> None:
    """``save_state`` into a temporary directory, then rename; older checkpoints go once the new one exists, so a
    crash at any point leaves the last complete checkpoint in place."""
    final = run_dir / "checkpoints" / f"step_{state['step']}"
    temporary = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerate_log, notice = logging.getLogger("accelerate.utils.other"), _TiedWeightsNotice()
    accelerate_log.addFilter(notice)
    try:
        accelerator.save_state(str(temporary), safe_serialization=True)
    finally:
        accelerate_log.removeFilter(notice)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # inside the temporary directory: the rename below is what makes the checkpoint exist
        (temporary / STATE_FILE).write_text(json.dumps({**state, "files": file_digests(temporary)}))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for _, older in checkpoints(run_dir)[:-1]:
            shutil.rmtree(older)
    accelerator.wait_for_everyone()
