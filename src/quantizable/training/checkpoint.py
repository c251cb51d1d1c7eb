"""Checkpoint I/O of a run directory: atomic ``checkpoints/step_N`` written by ``accelerator.save_state`` with the
SHA-256 of every file in ``trainer_state.json``, verified before a resume loads anything, the rules of what a
resume may change, and the metrics log cut back to the checkpoint's step.
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

    from quantizable.training.config import TrainConfig

STATE_FILE = "trainer_state.json"
# What a resume may change: how often the run logs, evaluates, checkpoints and measures, and the precision of the
# machine it continues on. Everything else (model, data, attention, optimizer, number of steps, which shapes the
# learning-rate schedule, batch size, seed) is what the checkpoint was trained with and must stay.
RESUMABLE_KEYS = ("run.eval_every", "run.eval_batches", "run.checkpoint_every", "run.log_every", "run.outlier_every",
                  "run.snapshot_every", "run.mixed_precision", "run.compile", "run.loader_workers")


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


def _finished_steps(run_dir: Path) -> int | None:
    """The step count of the finished run in ``run_dir`` (``summary.json`` is written last), else ``None``."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return int(summary.get("step", 0)) if summary.get("finished") else None


def _further_training(run_dir: Path) -> str:
    return (f"to train it further, fine-tune from its weights into a new directory: quantizable train --config "
            f"{run_dir / 'config.yaml'} --init-from {run_dir} --set run.steps=N --out NEW_DIR (new optimizer and "
            f"learning-rate schedule)")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite: a run with checkpoints needs ``resume``; a finished run is never trained again in place
    (``resume`` included: its ``model/`` would be replaced, and more steps would restart the learning-rate schedule)."""
    finished = _finished_steps(run_dir)
    if finished is not None:
        if resume:
            raise ValueError(f"{run_dir} holds a finished run ({finished} steps); --resume only continues unfinished "
                             f"runs; {_further_training(run_dir)}")
        raise ValueError(f"{run_dir} holds a finished run; choose another --out ({_further_training(run_dir)})")
    if resume:
        return
    if (run_dir / "model").exists():
        raise ValueError(f"{run_dir} holds a run that was stopped while saving its model; pass --resume to finish it")
    if checkpoints(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "overrides"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(run_dir: Path, config: TrainConfig) -> bool:
    """Refuse a resume whose config changes what ``run_dir`` was started with (anything but
    :data:`RESUMABLE_KEYS`): the checkpoint would not fit (another model or attention), or the change would be
    silently ignored (the optimizer and schedule come from the checkpoint) or mix two runs in one. Returns whether
    ``config.yaml`` needs rewriting (an allowed key changed)."""
    from quantizable.training.config import TrainConfig

    stored_file = run_dir / "config.yaml"
    if not stored_file.is_file():
        return True
    stored, new = _flat(TrainConfig.from_run(run_dir).to_dict()), _flat(config.to_dict())
    changed = [key for key in stored.keys() | new.keys() if stored.get(key) != new.get(key)]
    sections = ["model", "attention", "data", "optim", "run"]  # the most telling difference first
    fixed = sorted((key for key in changed if key not in RESUMABLE_KEYS),
                   key=lambda key: (sections.index(key.split(".")[0]), key))
    if fixed:
        shown = "; ".join(f"{key} is {stored.get(key)!r} there, got {new.get(key)!r}" for key in fixed[:3])
        more = f" (and {len(fixed) - 3} more)" if len(fixed) > 3 else ""
        raise ValueError(f"--resume continues {run_dir} as it was started ({stored_file}): {shown}{more}; only "
                         f"{', '.join(RESUMABLE_KEYS)} may change on resume; choose another --out for a different run")
    return bool(changed)


def check_resume_init_from(state: dict[str, Any], init_from: str | Path | None) -> str | None:
    """The ``--init-from`` a resumed run was started with (recorded in its checkpoints); refuses another one."""
    if "init_from" not in state:  # written before this was recorded
        return None if init_from is None else str(init_from)
    recorded = state["init_from"]
    if init_from is not None and str(Path(init_from).resolve()) != recorded:
        was = f"--init-from {recorded}" if recorded else "no --init-from (trained from scratch)"
        raise ValueError(f"--resume continues the run as it was started, with {was}; got --init-from {init_from}; "
                         "resume without --init-from, or choose another --out for a different run")
    return recorded


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
