"""One trainer for every family (MLM, CLM, image classification) on Hugging Face accelerate.

The run directory holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per log),
``tb/`` (TensorBoard), ``checkpoints/step_N`` (``accelerator.save_state``, written atomically) and, when finished,
``model/`` (``save_pretrained`` plus the tokenizer) and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from quantizable.evaluation import evaluate
from quantizable.models import (FAMILIES, MODEL_PRESETS, apply_attention_spec, create_model, family_of_config,
                                load_model)
from quantizable.training.allocator import keep_freed_memory
from quantizable.training.config import TrainConfig
from quantizable.training.optim import make_optimizer, make_scheduler

STATE_FILE = "trainer_state.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not match the digests recorded when it was written (truncated or damaged)."""


@dataclass
class TaskData:
    """What the trainer needs from the data layer for one task."""

    train: Any
    collate: Callable[[int], Callable | None]  # the training collator of an epoch
    validation_loader: Callable[[], Any]  # a fresh loader with the same (seeded) batches every call
    tokens_per_sample: int  # for throughput: seq_len for text, 1 (image) for images


def _preset_task(preset: str) -> str:
    family = MODEL_PRESETS[preset][0] if preset in MODEL_PRESETS else preset
    if family not in FAMILIES:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join([*MODEL_PRESETS, *FAMILIES])}")
    return FAMILIES[family].task


def build_model(config: TrainConfig, init_from: str | Path | None = None) -> tuple[PreTrainedModel, Any]:
    """The model to train and its tokenizer (``None`` for images).

    From scratch: the model preset with the attention spec and the tokenizer's vocabulary size. Fine-tuning
    (``init_from``, paper B.6): the pretrained model with the spec applied (pretrained weights bit-identical, only
    gates new) and the checkpoint's own tokenizer when it has one.
    """
    from quantizable import data

    if init_from is not None:
        model = apply_attention_spec(load_model(init_from), config.attention)
        task = family_of_config(model.config).task
        tokenizer = None
        if task != "image":
            tokenizer = data.checkpoint_tokenizer(init_from)
            if tokenizer is None:
                tokenizer = data.load_tokenizer(config.data.tokenizer or data.DEFAULT_TOKENIZER[task])
            if len(tokenizer) > model.config.vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model at {init_from} only "
                                 f"{model.config.vocab_size}; set data.tokenizer to the one it was trained with")
    else:
        task = _preset_task(config.model.preset)
        tokenizer, extra = None, {}
        if task != "image":
            tokenizer = data.source_tokenizer(config.data.source,
                                              config.data.tokenizer or data.DEFAULT_TOKENIZER[task])
            extra = {"vocab_size": len(tokenizer)}
            if tokenizer.pad_token_id is not None:
                extra["pad_token_id"] = tokenizer.pad_token_id
        model = create_model(config.model.preset, config.attention, **{**config.model.overrides, **extra})
    limit = getattr(model.config, "max_position_embeddings", None)
    if task != "image" and limit is not None and config.data.seq_len > limit:
        raise ValueError(f"data.seq_len={config.data.seq_len} is above the model's max_position_embeddings={limit}; "
                         f"use data.seq_len <= {limit} or set model.overrides.max_position_embeddings")
    return model.train(), tokenizer


def task_data(config: TrainConfig, task: str, tokenizer: Any) -> TaskData:
    """Training dataset, its collator and a validation-loader factory from :mod:`quantizable.data`."""
    from quantizable import data

    source, run = config.data.source, config.run
    if task == "image":
        train = data.image_dataset("train", source=source)
        validation = data.image_dataset("validation", source=source)
        collate, make_eval_collate, tokens = lambda epoch: None, lambda: None, 1
    else:
        train = data.text_dataset("train", tokenizer, config.data.seq_len, task, source=source)
        validation = data.text_dataset("validation", tokenizer, config.data.seq_len, task, source=source)
        tokens = config.data.seq_len
        if task == "mlm":
            # Masks are a function of (seed, epoch, block): they change every epoch, yet do not depend on when the
            # loader (which prefetches) draws random numbers, so a resumed run sees the same masks.
            def collate(epoch: int) -> Callable:
                epoch_seed = run.seed + 1_000_003 * (epoch + 1)
                return data.mlm_collator(tokenizer, config.data.mlm_probability, seed=epoch_seed)

            make_eval_collate = lambda: data.mlm_collator(tokenizer, config.data.mlm_probability, seed=run.seed)
        else:
            collate = lambda epoch: data.clm_collator()
            make_eval_collate = data.clm_collator
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"the {task} data has no training or validation samples "
                         f"(data.seq_len={config.data.seq_len} too long for it?)")

    def validation_loader():
        loader = data.make_loader(validation, run.batch_size, make_eval_collate(), shuffle=False, seed=run.seed)
        loader.generator = torch.Generator().manual_seed(run.seed)  # iterating it must not draw from the global RNG
        return loader

    return TaskData(train, collate, validation_loader, tokens)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# The numbers of ``analyze`` logged during training: the paper's outlier metrics and the no-op mechanism's
TRAINING_METRICS = ("max_inf_norm", "avg_kurtosis", "sink_share", "value_drain", "residual_peak", "dormant_share")


def training_outlier_metrics(model: nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, float]:
    """``analyze``'s model-level numbers on one fixed batch (the same definitions as every report)."""
    from quantizable.analysis import analyze

    result = analyze(model, [{k: v for k, v in batch.items() if k != "labels"}], tokenizer=tokenizer)
    return {key: float(result[key]) for key in TRAINING_METRICS if result.get(key) is not None}


def weight_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes, to check that processes hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
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
    if _checkpoints(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it")


def _truncate_metrics(path: Path, step: int) -> None:
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
    staging = path.with_name(f".tmp_{path.name}")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, path)


class _Batches:
    """Training micro-batches forever: epoch ``e`` is shuffled with seed ``seed + e``, so a position
    (epoch, batch) is enough to restart at exactly the same batch."""

    def __init__(self, accelerator: Accelerator, data: TaskData, batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0) -> None:
        self.accelerator, self.data, self.batch_size, self.seed = accelerator, data, batch_size, seed
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from quantizable.data import make_loader

        while True:
            loader = make_loader(self.data.train, self.batch_size, self.data.collate(self.epoch), shuffle=True,
                                 seed=self.seed + self.epoch)
            loader = self.accelerator.prepare_data_loader(loader)
            if self.position:
                loader = self.accelerator.skip_first_batches(loader, self.position)
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


def _file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file a checkpoint holds, so a truncated or damaged one is caught before it is loaded."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file() and path.name != STATE_FILE}


def _verified_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint whose files match the digests recorded when it was written."""
    state = json.loads((path / STATE_FILE).read_text())
    if "files" not in state or "scheduler" not in state:
        raise CorruptCheckpointError(f"checkpoint {path} was written by an older version of quantizable (no file "
                                     f"digests or scheduler state); delete {path} to restart the run from scratch")
    actual = _file_digests(path)
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


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict[str, Any]) -> None:
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
        (temporary / STATE_FILE).write_text(json.dumps({**state, "files": _file_digests(temporary)}))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for _, older in _checkpoints(run_dir)[:-1]:
            shutil.rmtree(older)
    accelerator.wait_for_everyone()


def _optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterator[dict[str, torch.Tensor]], grad_clip: float | None) -> float:
    """One optimizer update over ``grad_accum`` micro-batches (fewer at the end of an epoch, where accelerate
    syncs); returns the mean micro-batch loss, averaged over processes."""
    micro_losses = []
    while True:
        with accelerator.accumulate(model):
            loss = model(**next(batches)).loss
            micro_losses.append(loss.detach().float())
            accelerator.backward(loss)
            if accelerator.sync_gradients and grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            return accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_from: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or fine-tune, with ``init_from``) a model as configured; returns the run summary.

    ``resume`` continues from the last checkpoint in ``out_dir`` with the optimizer, scheduler, RNG and data
    position restored. ``stop_after`` ends this invocation (with a checkpoint) after that many optimizer steps in
    total, for time-sliced jobs; a later ``resume`` continues with the same schedule.
    """
    run_dir = Path(out_dir)
    check_run_dir(run_dir, resume)
    checkpoints = _checkpoints(run_dir) if resume else []
    resumed = _verified_state(checkpoints[-1][1]) if checkpoints else None  # checked before anything is written
    run = config.run
    accelerator = Accelerator(
        gradient_accumulation_steps=config.optim.grad_accum,
        mixed_precision=_mixed_precision(run.mixed_precision),
        log_with="tensorboard",
        project_dir=str(run_dir),
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch start CPU (gloo) process groups
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults on the buffers every step frees and allocates again
    set_seed(run.seed)
    model, tokenizer = build_model(config, init_from)
    task = family_of_config(model.config).task
    data = task_data(config, task, tokenizer)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    accelerator.init_trackers("tb")

    optimizer = make_optimizer(model, config.optim)
    scheduler = make_scheduler(optimizer, run.steps, config.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler (stepped by us once per update, whatever the process count) is saved as JSON in the trainer
    # state, not through register_for_checkpointing, which accelerate would read back by unpickling (weights_only=False).

    step, epoch, position = 0, 0, 0
    if resumed is not None:
        accelerator.load_state(str(checkpoints[-1][1]))
        scheduler.load_state_dict(resumed["scheduler"])
        step, epoch, position = resumed["step"], resumed["epoch"], resumed["position"]
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", step)  # a fresh or resumed log reads like one run
    position_source = _Batches(accelerator, data, run.batch_size, run.seed, epoch, position)
    batches = iter(position_source)
    outlier_batch = next(iter(data.validation_loader()))
    unwrapped = accelerator.unwrap_model(model)

    def write_metrics(record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(scalars, step=record["step"])
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    end = run.steps if stop_after is None else min(run.steps, stop_after)
    bar = tqdm(total=run.steps, initial=step, desc="train",
               disable=not (progress and accelerator.is_local_main_process))
    losses: list[float] = []
    last_eval: dict[str, Any] | None = None
    last_eval_step = -1
    started, start_step = time.perf_counter(), step
    model.train()
    while step < end:
        step_loss = _optimizer_step(accelerator, model, optimizer, batches, config.optim.grad_clip)
        if not math.isfinite(step_loss):
            raise TrainingDivergedError(f"loss became {step_loss} at step {step + 1}; lower optim.lr or check the data")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        record: dict[str, Any] = {}
        if run.log_every and step % run.log_every == 0:
            window = losses[-run.log_every:]
            record.update(loss=sum(window) / len(window), lr=lr)
        if run.outlier_every and step % run.outlier_every == 0:
            record.update(training_outlier_metrics(unwrapped, outlier_batch, tokenizer))
        if run.eval_every and step % run.eval_every == 0:
            last_eval = evaluate(unwrapped, data.validation_loader(), max_batches=run.eval_batches or None)
            last_eval_step = step
            record[f"eval_{last_eval['metric']}"] = last_eval["value"]
        if record:
            write_metrics({"step": step, **record})
        if (run.checkpoint_every and step % run.checkpoint_every == 0) or (step == end < run.steps):
            _save_checkpoint(accelerator, run_dir, {"step": step, "epoch": position_source.epoch,
                                                    "position": position_source.position,
                                                    "scheduler": scheduler.state_dict()})
    bar.close()
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "task": task,
        "step": step,
        "finished": step >= run.steps,
        "losses": losses,
        "train_seconds": elapsed,
        "samples_per_second": (step - start_step) * run.batch_size * config.optim.grad_accum
        * accelerator.num_processes / elapsed if elapsed > 0 and step > start_step else None,
        "tokens_per_sample": data.tokens_per_sample,
        "eval": last_eval,
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
    }
    full_state = accelerator.get_state_dict(model)  # gathered across FSDP shards; only complete on rank 0 there
    if accelerator.distributed_type != DistributedType.FSDP:
        summary["weight_digests"] = gather_object([weight_digest(full_state)])
    if summary["finished"]:
        if last_eval_step != step:
            summary["eval"] = evaluate(unwrapped, data.validation_loader(), max_batches=run.eval_batches or None)
        if accelerator.is_main_process:
            # written under temporary names and renamed: a run killed here leaves no model/ or summary.json that
            # looks finished, and --resume redoes the last steps from the checkpoint
            staging = run_dir / ".tmp_model"
            if staging.exists():
                shutil.rmtree(staging)
            unwrapped.save_pretrained(staging, state_dict=full_state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if (run_dir / "model").exists():
                shutil.rmtree(run_dir / "model")
            staging.rename(run_dir / "model")
            saved = {k: v for k, v in summary.items() if k != "losses"}
            (run_dir / ".tmp_summary.json").write_text(json.dumps(saved, indent=2))
            os.replace(run_dir / ".tmp_summary.json", run_dir / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary

