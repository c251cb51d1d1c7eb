"""The paper's comparison (table 2) at the scale of the machine: vanilla vs clipped softmax vs gated attention.

For each family and method, train with each training seed (the tasks and scales of ``experiments.plan``), then
measure (``experiments.measure``) the floating-point metric, the outlier metrics of ``analyze`` and simulated W8A8
quality over several calibration seeds, and aggregate the seeds (``experiments.aggregate``). Every run lives in a
directory named by a hash of its resolved settings, so finished runs are reused and results of different settings
never mix; an interrupted training resumes from its last checkpoint; each measurement is written atomically next
to its run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantizable.attention.spec import KINDS
from quantizable.experiments.aggregate import aggregate
from quantizable.experiments.curves import measure_curve, measure_point
from quantizable.experiments.measure import (MEASURE_VERSION, load_run, measure, measure_int8, measure_ptq,
                                             quant_base, task_score)
from quantizable.experiments.plan import METHODS, SCALES, TASKS, TRAINED_FAMILIES, Scale, fingerprint, run_config
from quantizable.experiments.results import RunMeasurement
from quantizable.io import write_json_atomic
from quantizable.training.config import TrainConfig

@dataclass(frozen=True)
class Job:
    """One (family, method, training seed) of a reproduction: train it if needed, then measure it."""

    family: str
    method: str
    seed: int
    out: Path
    scale: Scale
    overrides: tuple[str, ...]
    label: str
    task: str = "pretrain"
    ptq: tuple[str, ...] = ()  # PTQ baselines to measure as well (quantization.ptq names)
    setup: str = "default"  # the quantization setup of the W8A8 measurements (quantization.setups)


def job_run(job: Job) -> tuple[TrainConfig, Path]:
    """The training configuration of a job and its run directory (named by a hash of all its settings)."""
    config = run_config(job.family, job.method, job.seed, job.scale, job.overrides, job.task)
    prefix = "" if job.task == "pretrain" else f"{job.task}-"
    name = f"{prefix}{job.family}-{job.method}-seed{job.seed}-{fingerprint(config, job.scale)}"
    return config, job.out / "runs" / name


def trained_steps(run_dir: Path) -> int:
    """Optimizer steps a run has logged so far (its ``metrics.jsonl``), for progress across worker processes."""
    try:
        lines = (run_dir / "metrics.jsonl").read_bytes().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def run_job(job: Job, progress: bool = True) -> RunMeasurement:
    """Train (or resume, or reuse) one run and measure it once; returns its measurements.

    Everything it produces lives in the run's hashed directory and is written atomically, so any number of
    processes can work on different jobs of one reproduction, and a killed job continues where it stopped.
    """
    from quantizable.training import train

    config, run_dir = job_run(job)
    measure_name = "measure.json" if job.setup == "default" else f"measure-{job.setup}.json"
    result_path, int8_path, ptq_path = run_dir / measure_name, run_dir / "int8" / "int8.json", run_dir / "ptq.json"
    ptq_done = json.loads(ptq_path.read_text()) if ptq_path.is_file() else {}
    ptq_todo = tuple(name for name in job.ptq if name not in ptq_done)
    if result_path.is_file() and json.loads(result_path.read_text()).get("version") != MEASURE_VERSION:
        result_path.unlink()  # measured by an older version: measure again, the training is kept
    if result_path.is_file() and int8_path.is_file() and not ptq_todo:
        print(f"{job.label}: reusing {run_dir.name}", flush=True)
    elif not (run_dir / "model" / "config.json").is_file():
        resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        print(f"{job.label}: training ({config.run.steps} steps{', resuming' if resume else ''})", flush=True)
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint
        train(config, run_dir, resume=resume, progress=progress)
    loaded = functools.cache(lambda: load_run(run_dir, job.scale))  # once for all measurements, when needed
    if not (result_path.is_file() and int8_path.is_file()) or ptq_todo:
        run = loaded()
        if not result_path.is_file():
            print(f"{job.label}: measuring FP, outliers, no-op mechanism, W8A8 and the bit-width sweep", flush=True)
            write_json_atomic(result_path, measure(run, run_dir, job.scale, job.setup).to_dict())
        if not int8_path.is_file():  # also for runs measured before the INT8 column existed
            print(f"{job.label}: measuring real INT8 (ONNX Runtime)", flush=True)
            measure_int8(run, run_dir, job.scale)
        if ptq_todo:
            print(f"{job.label}: measuring PTQ baselines {', '.join(ptq_todo)}", flush=True)
            ptq_done = {**ptq_done, **measure_ptq(run, job.scale, ptq_todo)}
            write_json_atomic(ptq_path, ptq_done)
    curve = None
    if job.scale.curve:
        def point(model: Any) -> dict[str, Any]:
            run = loaded()
            return measure_point(model, run.calibration, run.eval_batches, quant_base(model, job.setup),
                                 job.scale.calib_seeds, task_score(run))
        curve = measure_curve(run_dir, point, "curve" if job.setup == "default" else f"curve-{job.setup}",
                              report=lambda line: print(f"{job.label}: {line}", flush=True))
    measured = RunMeasurement.from_dict(json.loads(result_path.read_text()))
    return dataclasses.replace(measured, int8=json.loads(int8_path.read_text()), run_dir=str(run_dir), seed=job.seed,
                               curve=curve, ptq={name: ptq_done[name] for name in job.ptq} if job.ptq else None)


def resolve_workers(workers: int | None, jobs: int) -> int:
    """``None`` means one worker per CPU core on a CPU-only machine (each trains with one thread: the small
    presets scale better across processes than across threads) and one worker when a GPU is present."""
    if workers is None:
        workers = 1 if torch.cuda.is_available() else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, min(workers, jobs))


def _stop_children(keep: set[Any], patience_s: float = 30.0) -> None:
    """Terminate the worker processes this process started (all children but ``keep``), also any the executor
    starts while the others stop."""
    deadline = time.monotonic() + patience_s
    while (children := set(multiprocessing.active_children()) - keep) and time.monotonic() < deadline:
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=1)


def quiet_transformers() -> None:
    """No per-file loading / saving bars from transformers: they would bury the job lines and the one bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_transformers()


def _run_all(jobs: list[Job], workers: int, progress: bool, started: float) -> list[RunMeasurement]:
    """Results of ``run_job`` in job order: in this process, or in ``workers`` spawned processes that share the
    CPU cores."""
    if workers == 1:
        results = []
        for job in jobs:
            results.append(run_job(job, progress))
            print(f"    elapsed {time.time() - started:.0f} s", flush=True)
        return results
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from quantizable.progress import Progress

    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"running {len(jobs)} jobs in {workers} worker processes, {threads} thread(s) each", flush=True)
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and torch state
    runs = [job_run(job) for job in jobs]
    total = sum(config.run.steps for config, _ in runs)
    others = set(multiprocessing.active_children())  # children that are not ours to stop
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    futures = [pool.submit(run_job, job, False) for job in jobs]
    try:
        # the workers' own bars would interleave: one bar over the training steps of all jobs, read from the
        # metrics every run logs, and the count of finished jobs
        # (a bar on a terminal, a plain line now and then in a piped log)
        bar = Progress(total, "reproduce", enabled=progress)
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=5, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            steps = sum(config.run.steps if future.done() else min(trained_steps(run_dir), config.run.steps)
                        for future, (config, run_dir) in zip(futures, runs))
            bar.update(steps - bar.count, runs=f"{len(futures) - len(pending)}/{len(jobs)} done")
        bar.close()
    except BaseException:
        # Ctrl-C or a failed job: stop now rather than after the queued jobs; every run resumes from its last
        # checkpoint (or reuses its finished measurements) when reproduce is run again
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children(others)
        pool.shutdown(wait=True)
        _stop_children(others)
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def reproduce(out: Path, scale_name: str = "full", families: tuple[str, ...] | None = None,
              methods: tuple[str, ...] | None = METHODS, progress: bool = True, overrides: tuple[str, ...] = (),
              train_seeds: int | None = None, workers: int | None = 1,
              tasks: tuple[str, ...] | None = ("pretrain",), ptq: tuple[str, ...] = (),
              setup: str = "default") -> list[dict[str, Any]]:
    """Train and measure every (task, family, method, seed); write ``results.json`` and ``report.md`` under ``out``.

    ``tasks`` are names of ``TASKS`` (``backcopy``, ``pretrain``; None: those that define the scale), each run on
    its own families (``families`` keeps only those); ``methods`` are attention kinds (``attention.spec.KINDS``;
    None: the task's own for the scale, e.g. ``LONG_METHODS`` at ``long``). ``overrides`` (``key=value``,
    as ``train --set``) apply to every run on top of the scale: the recipe search uses them; ``train_seeds`` keeps
    only the first so many training seeds of the scale; ``workers`` runs that many jobs at once in separate
    processes (``None``: one per CPU core, see ``resolve_workers``); ``ptq`` names PTQ baselines
    (``quantization.ptq``, e.g. ``smoothquant:0.5``) measured on every run as well (row field ``ptq``); ``setup``
    the quantization setup of every W8A8 number (``default`` or ``paper``, row field ``setup``).
    """
    from quantizable.quantization.ptq import parse_ptq
    from quantizable.quantization.setups import get_setup

    get_setup(setup)  # an unknown setup fails here, listing the known ones

    ptq = tuple(parse_ptq(name).name for name in ptq)  # an unknown name fails here, listing the valid ones
    if scale_name not in SCALES:
        raise ValueError(f"unknown scale {scale_name!r}; known: {', '.join(SCALES)}")
    if tasks is None:  # the tasks that define the scale
        tasks = tuple(name for name, task in TASKS.items() if scale_name in task.overrides)
    without = [name for name in tasks if name in TASKS and scale_name not in TASKS[name].overrides]
    if without:
        owners = [name for name, task in TASKS.items() if scale_name in task.overrides]
        raise ValueError(f"task {without[0]} has no scale {scale_name!r} (its scales: "
                         f"{', '.join(TASKS[without[0]].overrides)}); scale {scale_name!r} trains: {', '.join(owners)}")
    task_methods = {task: methods if methods is not None else
                    TASKS[task].scale_methods.get(scale_name, METHODS) for task in tasks if task in TASKS}
    for what, given, known in (("tasks", tasks, tuple(TASKS)), ("families", families or (), TRAINED_FAMILIES),
                               ("methods", tuple(dict.fromkeys(m for ms in task_methods.values() for m in ms))
                                if methods is None else methods, KINDS)):
        unknown = [name for name in given if name not in known]
        if unknown or (not given and what != "families"):
            raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}" if unknown else f"no {what} given")
    plan = [(task, family) for task in tasks
            for family in (TASKS[task].scale_families.get(scale_name, TASKS[task].families) if families is None
                           else [f for f in TASKS[task].families if f in families])]
    if not plan:
        owners = "; ".join(f"{t}: {', '.join(TASKS[t].families)}" for t in tasks)
        raise ValueError(f"none of the families {', '.join(families or ())} belongs to the tasks ({owners})")
    scale = SCALES[scale_name]
    if train_seeds is not None:
        if not 1 <= train_seeds <= len(scale.train_seeds):
            raise ValueError(f"train_seeds must lie in 1..{len(scale.train_seeds)} for scale {scale_name!r}, "
                             f"got {train_seeds}")
        scale = dataclasses.replace(scale, train_seeds=scale.train_seeds[:train_seeds])
    for task, family in plan:  # a bad override or method setting fails here, before any training starts
        for method in task_methods[task]:
            run_config(family, method, 0, scale, overrides, task)
    out.mkdir(parents=True, exist_ok=True)
    combos = [(task, family, method, seed) for task, family in plan for method in task_methods[task]
              for seed in scale.train_seeds]
    jobs = [Job(family, method, seed, out, scale, overrides,
                f"[{index}/{len(combos)}] {task} {family} {method} seed {seed}", task, ptq, setup)
            for index, (task, family, method, seed) in enumerate(combos, 1)]
    workers = resolve_workers(workers, len(jobs))
    started = time.time()
    measured: dict[tuple[str, str, str], list[RunMeasurement]] = {}
    for job, result in zip(jobs, _run_all(jobs, workers, progress, started)):
        measured.setdefault((job.task, job.family, job.method), []).append(result)

    rows = [aggregate(task, family, method, runs, scale).to_dict()
            for (task, family, method), runs in measured.items()]
    summary = {"scale": scale_name, "setup": setup, "tasks": list(tasks), "overrides": list(overrides), "workers": workers,
               "elapsed_s": round(time.time() - started, 1), "rows": rows}
    write_json_atomic(out / "results.json", rows)
    write_json_atomic(out / "summary.json", summary)
    from quantizable.experiments.report import write_report

    write_report(out, rows, scale_name, overrides)
    return rows
