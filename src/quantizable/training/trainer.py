"""One trainer for every family (MLM, CLM, image classification) on Hugging Face accelerate.

The run directory holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per log),
``tb/`` (TensorBoard), ``checkpoints/step_N`` (``accelerator.save_state``, written atomically) and, when finished,
``model/`` (``save_pretrained`` plus the tokenizer) and ``summary.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn
from transformers import PreTrainedModel

from quantizable.attention.switch import compiled_fast_paths
from quantizable.data.tasks import TaskData, task_data
from quantizable.evaluation import evaluate
from quantizable.integrity import load_checked_model
from quantizable.io import write_json_atomic
from quantizable.models import FAMILIES, MODEL_PRESETS, apply_attention_spec, create_model, family_of_config
from quantizable.models.modeling import scale_clipping
from quantizable.progress import Progress
from quantizable.tasks import Task
from quantizable.training.allocator import keep_freed_memory
from quantizable.training.artifacts import save_model
from quantizable.training.checkpoint import (check_resume_config, check_resume_init_from, check_run_dir, checkpoints,
                                             save_checkpoint, truncate_metrics, verified_state, weight_digest)
from quantizable.training.config import TrainConfig
from quantizable.training.monitor import attention_liveness, dead_attention_warning, training_outlier_metrics
from quantizable.training.optim import make_optimizer, make_scheduler
from quantizable.training.qat import parse_setting, prepare_qat


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, after the step in progress was finished and saved as a checkpoint."""


@contextmanager
def _interrupt_after_step(enabled: bool) -> Iterator[list[bool]]:
    """While training, the first Ctrl-C or SIGTERM (what SLURM, Kubernetes and ``docker stop`` send before killing)
    only sets a flag, so the step in progress completes and can be saved (an update cut in half cannot); a second
    one stops at once. Off in multi-process runs, where one process saving alone would wait forever for the others."""
    requested = [False]
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = True

    for number in previous:
        signal.signal(number, handler)
    try:
        yield requested
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def _preset_task(preset: str) -> str:
    family = MODEL_PRESETS[preset][0] if preset in MODEL_PRESETS else preset
    if family not in FAMILIES:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join([*MODEL_PRESETS, *FAMILIES])}")
    return FAMILIES[family].task


def check_model_overrides(preset: str, overrides: dict[str, Any]) -> None:
    """``model.overrides`` must be settings of the preset's transformers config with values of their type: an
    unknown key would only be written into ``config.json`` and ignored, a wrong type fails deep inside the model."""
    import difflib

    from quantizable.models import QUANTIZABLE_CLASSES

    family = MODEL_PRESETS[preset][0] if preset in MODEL_PRESETS else preset
    config_class = QUANTIZABLE_CLASSES[family].config_class
    # beyond transformers' settings: num_labels (stored as id2label) and our ViT's patch LayerNorm (models/modeling.py)
    defaults = {**config_class().to_dict(), "num_labels": 2, "patch_layernorm": False}
    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"model.overrides.{key} is not a setting of {config_class.__bases__[0].__name__} "
                             f"(model.preset {preset}){hint}")
        default = defaults[key]
        if default is None or value is None:
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            fits = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, float):
            fits = isinstance(value, (int, float))
        else:
            fits = isinstance(value, type(default))
        if not fits:
            raise ValueError(f"model.overrides.{key} must be a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}")


def build_model(config: TrainConfig, init_from: str | Path | None = None) -> tuple[PreTrainedModel, Any]:
    """The model to train and its tokenizer (``None`` for images).

    From scratch: the model preset with the attention spec and the tokenizer's vocabulary size. Fine-tuning
    (``init_from``, paper B.6): the pretrained model with the spec applied (pretrained weights bit-identical, only
    gates new) and the checkpoint's own tokenizer when it has one.
    """
    from quantizable import data

    if init_from is not None:
        model = apply_attention_spec(load_checked_model(init_from, new_weights=True), config.attention)
        for key, value in config.model.structure().items():  # architecture: the checkpoint's, never silently dropped
            if getattr(model.config, key, None) != value:
                raise ValueError(f"{init_from} was not trained with {key}={value!r} (model.norm / "
                                 "model.embedding_projection / model.registers): with --init-from the checkpoint's "
                                 "architecture is used; drop the setting, or train from scratch")
        task = family_of_config(model.config).task
        tokenizer = None
        if task == Task.IMAGE:
            classes = data.image_classes(config.data.source)
            if model.config.num_labels != len(classes):
                raise ValueError(f"the model at {init_from} has {model.config.num_labels} labels but the image data "
                                 f"has {len(classes)} classes ({', '.join(classes[:5])}...)")
        else:
            tokenizer = data.checkpoint_tokenizer(init_from)
            if tokenizer is None:
                tokenizer = data.load_tokenizer(config.data.tokenizer or data.DEFAULT_TOKENIZER[task])
            if len(tokenizer) > model.config.vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model at {init_from} only "
                                 f"{model.config.vocab_size}; set data.tokenizer to the one it was trained with")
    else:
        task = _preset_task(config.model.preset)
        check_model_overrides(config.model.preset, config.model.overrides)
        tokenizer = None
        if task != Task.IMAGE:
            tokenizer = data.source_tokenizer(config.data.source,
                                              config.data.tokenizer or data.DEFAULT_TOKENIZER[task])
            extra = {"vocab_size": len(tokenizer), **data.special_token_ids(tokenizer, task)}
        else:
            extra = data.label_settings(data.image_classes(config.data.source), config.model.overrides)
        model = create_model(config.model.preset, config.attention,
                             **{**config.model.overrides, **extra, **config.model.structure()})
    limit = getattr(model.config, "max_position_embeddings", None)
    if task != Task.IMAGE and limit is not None and config.data.seq_len > limit:
        raise ValueError(f"data.seq_len={config.data.seq_len} is above the model's max_position_embeddings={limit}; "
                         f"use data.seq_len <= {limit} or set model.overrides.max_position_embeddings")
    return model.train(), tokenizer


def _mixed_precision(setting: str) -> str:
    """What accelerate runs for ``run.mixed_precision``; fp16 without a GPU is refused rather than recorded and
    silently run in fp32 (CPU autocast has bf16, not fp16)."""
    if setting == "fp16" and not torch.cuda.is_available():
        raise ValueError("run.mixed_precision=fp16 needs a CUDA GPU and none is visible; on CPU use bf16 or no "
                         "(auto picks no)")
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class _Batches:
    """Training micro-batches forever: epoch ``e`` is shuffled with seed ``seed + e``, so a position
    (epoch, batch) is enough to restart at exactly the same batch."""

    def __init__(self, accelerator: Accelerator, data: TaskData, batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0, workers: int = 0) -> None:
        self.accelerator, self.data, self.batch_size, self.seed = accelerator, data, batch_size, seed
        self.epoch, self.position, self.workers = epoch, position, workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from quantizable.data import make_loader

        while True:
            loader = make_loader(self.data.train, self.batch_size, self.data.collate(self.epoch), shuffle=True,
                                 seed=self.seed + self.epoch, workers=self.workers)
            loader = self.accelerator.prepare_data_loader(loader)
            if self.position:
                loader = self.accelerator.skip_first_batches(loader, self.position)
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


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

    ``resume`` continues an unfinished run from the last checkpoint in ``out_dir`` with the optimizer, scheduler,
    RNG and data position restored; the config may only differ from the run's in
    :data:`~quantizable.training.checkpoint.RESUMABLE_KEYS`, and a finished run is refused. ``stop_after`` ends this
    invocation (with a checkpoint) after that many optimizer steps in total, for time-sliced jobs; a later
    ``resume`` continues with the same schedule. Ctrl-C or SIGTERM saves the step in progress and raises
    :class:`TrainingInterrupted`.
    """
    run_dir = Path(out_dir)
    # every refusal happens here, before anything is written
    mixed_precision = _mixed_precision(config.run.mixed_precision)
    check_run_dir(run_dir, resume)
    write_config = check_resume_config(run_dir, config) if resume else True
    found = checkpoints(run_dir) if resume else []
    if resume and not found:  # e.g. a requeued cluster job that always passes --resume, killed before step 1
        print(f"no checkpoint in {run_dir} to resume from: starting at step 0", flush=True)
    resumed = verified_state(found[-1][1]) if found else None
    if resumed is not None:
        init_from = check_resume_init_from(resumed, init_from)
    recorded_init = None if init_from is None else str(Path(init_from).resolve())
    run = config.run
    accelerator = Accelerator(
        gradient_accumulation_steps=config.optim.grad_accum,
        mixed_precision=mixed_precision,
        dynamo_backend="inductor" if run.compile else "no",
        log_with="tensorboard",
        project_dir=str(run_dir),
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch start CPU (gloo) process groups
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults on the buffers every step frees and allocates again
    set_seed(run.seed)
    model, tokenizer = build_model(config, init_from)
    task = family_of_config(model.config).task
    data = task_data(config, task, tokenizer, model.config)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if write_config:
            config.save(run_dir / "config.yaml")
    accelerator.init_trackers("tb")

    qat = None if config.qat.setting is None else prepare_qat(
        model, parse_setting(config.qat.setting),
        itertools.islice(data.validation_loader(), config.qat.calibration_batches))
    optimizer = make_optimizer(model, config.optim)
    scheduler = make_scheduler(optimizer, run.steps, config.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler (stepped by us once per update, whatever the process count) is saved as JSON in the trainer
    # state, not through register_for_checkpointing, which accelerate would read back by unpickling (weights_only=False).

    step, epoch, position = 0, 0, 0
    if resumed is not None:
        accelerator.load_state(str(found[-1][1]))
        scheduler.load_state_dict(resumed["scheduler"])
        step, epoch, position = resumed["step"], resumed["epoch"], resumed["position"]
        if accelerator.is_main_process:
            print(f"resuming {run_dir} at step {step} of {run.steps} (from {found[-1][1]})", flush=True)
    if accelerator.is_main_process:
        truncate_metrics(run_dir / "metrics.jsonl", step)  # a fresh or resumed log reads like one run
    position_source = _Batches(accelerator, data, run.batch_size, run.seed, epoch, position, run.loader_workers)
    batches = iter(position_source)
    outlier_batch = next(iter(data.validation_loader()))
    # the eager module (same parameters) for measuring, evaluating and saving: under run.compile the analysis hooks
    # and their .item() calls would otherwise be traced, breaking the graph a dozen times and recompiling the
    # training graph after every measurement
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    gamma_warmup = config.optim.gamma_warmup_steps

    def warm_gamma() -> None:
        if gamma_warmup and step <= gamma_warmup:
            scale_clipping(unwrapped, step / gamma_warmup)

    def write_metrics(record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(scalars, step=record["step"])
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    end = run.steps if stop_after is None else min(run.steps, stop_after)
    bar = Progress(run.steps, "train", enabled=progress and accelerator.is_local_main_process, initial=step)
    losses: list[float] = []
    last_eval: dict[str, Any] | None = None
    last_eval_step = -1
    started, start_step = time.perf_counter(), step
    saved_step = step

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir, {"step": step, "epoch": position_source.epoch,
                                               "position": position_source.position,
                                               "scheduler": scheduler.state_dict(), "init_from": recorded_init})

    warm_gamma()
    liveness = attention_liveness(unwrapped, outlier_batch, tokenizer) if step == 0 else None
    if liveness is not None:
        write_metrics({"step": 0, **liveness})
        warning = dead_attention_warning(unwrapped, liveness)
        if warning and accelerator.is_main_process:
            print(warning, flush=True)
    model.train()
    # run.compile on CPU traces our attention kernels instead of the reference ops: at the presets' batch 16 the
    # step is 11-23% faster that way (benchmarks/bench_compile.py, docs/performance.md)
    kernels_in_graph = compiled_fast_paths.enabled or (run.compile and accelerator.device.type == "cpu")
    with _interrupt_after_step(accelerator.num_processes == 1) as interrupted, compiled_fast_paths(kernels_in_graph):
        while step < end:
            warm_gamma()
            step_loss = _optimizer_step(accelerator, model, optimizer, batches, config.optim.grad_clip)
            if not math.isfinite(step_loss):
                raise TrainingDivergedError(f"loss became {step_loss} at step {step + 1}; lower optim.lr or check "
                                            "the data")
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            losses.append(step_loss)
            bar.update(1, loss=f"{step_loss:.4f}")
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
            if run.snapshot_every and step % run.snapshot_every == 0:
                state = accelerator.get_state_dict(model)  # every rank takes part in gathering FSDP shards
                if accelerator.is_main_process:
                    save_model(unwrapped, state, tokenizer, task, run_dir / "snapshots" / f"step_{step}")
            if (run.checkpoint_every and step % run.checkpoint_every == 0) or (step == end < run.steps):
                checkpoint()
                saved_step = step
            if interrupted[0]:
                if saved_step != step:
                    checkpoint()
                bar.close()
                raise TrainingInterrupted(f"interrupted: step {step} of {run.steps} saved in "
                                          f"{run_dir / 'checkpoints' / f'step_{step}'}; continue with: quantizable "
                                          f"train --resume --out {run_dir}")
    bar.close()
    if gamma_warmup:
        scale_clipping(unwrapped, 1.0)  # the configured gamma for the final evaluation and whoever uses the model
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
        **({"liveness_at_init": liveness} if liveness is not None else {}),
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
    }
    if qat is not None:
        qat.remove()  # a normal model, which quantize scores like any other
    full_state = accelerator.get_state_dict(model)  # gathered across FSDP shards; only complete on rank 0 there
    if accelerator.distributed_type != DistributedType.FSDP:
        summary["weight_digests"] = gather_object([weight_digest(full_state)])
    if summary["finished"]:
        if last_eval_step != step:
            summary["eval"] = evaluate(unwrapped, data.validation_loader(), max_batches=run.eval_batches or None)
        if accelerator.is_main_process:
            # written under temporary names and renamed: a run killed here leaves no model/ or summary.json that
            # looks finished, and --resume redoes the last steps from the checkpoint
            save_model(unwrapped, full_state, tokenizer, task, run_dir / "model")
            write_json_atomic(run_dir / "summary.json", {k: v for k, v in summary.items() if k != "losses"})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary

