"""The paper's comparison (table 2) at the scale of the machine: vanilla vs clipped softmax vs gated attention.

For each family and method, train with each training seed (the training presets of ``quantizable/presets``, scaled
by ``SCALES``), then measure the floating-point metric, the outlier metrics of ``analyze`` and simulated W8A8
quality over several calibration seeds. Every run lives in a directory named by a hash of its resolved settings, so
finished runs are reused and results of different settings never mix; an interrupted training resumes from its
last checkpoint; each measurement is written atomically next to its run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantizable.attention.spec import KINDS
from quantizable.data.backcopy import backcopy_bos_shares, backcopy_scores, is_backcopy
from quantizable.experiments.curves import aggregate_curve, measure_curve, measure_point
from quantizable.io import write_json_atomic
from quantizable.tasks import Task as ModelTask  # the local Task below is a reproduction task
from quantizable.training.config import TrainConfig, load_config

METHODS = ("vanilla", "clipped_softmax", "gated_attention")  # the paper's trio; any attention kind is accepted
BIT_WIDTHS = ("W8A8", "W8A6", "W8A4", "W6A8", "W4A8")  # the sensitivity curve: activation bits, then weight bits
# the long study's kinds: the paper's two, the other fixes that give a head a place to put nothing, and vanilla
LONG_METHODS = ("vanilla", "clipped_softmax", "gated_attention", "softmax_plus_one", "sink_token", "key_bias")
MEASURE_VERSION = 6  # bump when measure() gains fields, so older measure.json files are measured again

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
    scale_families: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # default subset per scale
    scale_methods: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # default methods per scale
    floors: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)  # family -> (metric, minimum)

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
    payload = json.dumps({"config": config.to_dict(), "calib": scale.calib_seeds, "calib_batches": scale.calib_batches,
                          "eval_batches": scale.eval_batches}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _batches(loader: Any, limit: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        if len(batches) == limit:
            break
        batches.append(batch)
    if len(batches) < limit:
        raise ValueError(f"the data holds only {len(batches)} batches, {limit} were asked for")
    return batches


@dataclass(frozen=True)
class RunData:
    """A trained run loaded once for all its measurements: the same model and batches for the simulator, the
    analysis and real INT8 (the simulator removes its quantizers when done)."""

    model: Any
    tokenizer: Any
    source: str | None  # the run's data.source
    eval_batches: list[dict[str, torch.Tensor]]
    calibration: Callable[[int], list[dict[str, torch.Tensor]]]  # calibration batches of a seed


def load_run(run_dir: Path, scale: Scale) -> RunData:
    """The model, tokenizer, evaluation batches and seeded calibration batches of a trained run."""
    from quantizable import data
    from quantizable.integrity import load_checked_model
    from quantizable.models import family_of_config

    config = TrainConfig.from_dict(json.loads(json.dumps(load_yaml(run_dir / "config.yaml"))))
    model = load_checked_model(run_dir)
    task = family_of_config(model.config).task
    tokenizer = None if task == ModelTask.IMAGE else data.checkpoint_tokenizer(run_dir)
    sets = data.task_data(config, task, tokenizer)
    eval_batches = _batches(sets.validation_loader(), scale.eval_batches)

    def calibration(seed: int) -> list[dict[str, torch.Tensor]]:
        loader = data.make_loader(sets.train, config.run.batch_size, sets.collate(0), shuffle=True, seed=seed)
        return _batches(loader, scale.calib_batches)

    return RunData(model, tokenizer, config.data.source, eval_batches, calibration)


MECHANISM_KEYS = ("sink_share", "value_drain", "residual_peak")  # analyze's no-op numbers, each with a per-layer list


def bit_widths(name: str) -> tuple[int, int]:
    """``"W8A6"`` -> (8, 6)."""
    weights, _, acts = name.removeprefix("W").partition("A")
    return int(weights), int(acts)


def quant_base(model: Any, setup: str) -> Any:
    """The W8A8 ``QuantConfig`` of a setup for a model's family (placement rules, grid, range estimators)."""
    from quantizable.models import family_of_config
    from quantizable.quantization import QuantConfig
    from quantizable.quantization.setups import get_setup

    recipe = get_setup(setup).calibration_for(family_of_config(model.config).name)
    return QuantConfig(setup=setup, weight_estimator=recipe.weight_estimator, act_estimator=recipe.act_estimator)


def task_score(run: RunData) -> Callable[[Any], dict[str, float]] | None:
    """The task's own metrics beside the main one (backcopy: copy accuracy, bigram excess), or None."""
    if not is_backcopy(run.source):
        return None

    def score(model: Any) -> dict[str, float]:
        return backcopy_scores(model, run.eval_batches, run.source)
    return score


def measure(run: RunData, run_dir: Path, scale: Scale, setup: str = "default") -> dict[str, Any]:
    """FP metric, outlier and no-op mechanism metrics, simulated W8A8 over the calibration seeds and the
    sensitivity sweep over ``BIT_WIDTHS`` of one trained run; the backcopy task also scores copy accuracy and
    bigram loss in FP and under W8A8. ``setup`` (``quantization.setups``) chooses the placement rules, grid and the
    family's range estimators; the calibration batches stay the scale's, so both setups see the same data."""
    from quantizable.analysis import analyze
    from quantizable.quantization import simulate_w8a8

    base = quant_base(run.model, setup)
    score = task_score(run)
    quant = simulate_w8a8(run.model, run.calibration, run.eval_batches, base, seeds=scale.calib_seeds, score=score)
    sweep = {"W8A8": quant["quantized"]["per_seed"]}
    for name in BIT_WIDTHS[1:]:
        weights, acts = bit_widths(name)
        swept = simulate_w8a8(run.model, run.calibration, run.eval_batches, seeds=scale.calib_seeds,
                              config=dataclasses.replace(base, weight_bits=weights, act_bits=acts))
        sweep[name] = swept["quantized"]["per_seed"]
    analysis = analyze(run.model, run.eval_batches[: scale.analysis_batches], tokenizer=run.tokenizer,
                       out_dir=run_dir / "analysis")
    return {
        "version": MEASURE_VERSION,
        "setup": setup,
        "estimators": {"weights": base.weight_estimator, "activations": base.act_estimator},
        "metric": quant["metric"],
        "fp": quant["fp"],
        "w8a8": quant["quantized"],
        "sites": quant["sites"],
        "bits_sweep": sweep,
        **({"scores": quant["scores"],
            **backcopy_bos_shares(run.model, run.eval_batches[: scale.analysis_batches], run.source)}
           if score is not None else {}),
        "max_inf_norm": analysis["max_inf_norm"],
        "avg_kurtosis": analysis["avg_kurtosis"],
        "per_layer_inf_norm": [row["mean_inf_norm"] for row in analysis["per_layer"]
                               if row["tensor"] == "block_out"],
        **{key: analysis.get(key) for key in MECHANISM_KEYS},
        **{f"{key}_per_layer": analysis.get(f"{key}_per_layer") for key in MECHANISM_KEYS},
        "dormant_share": analysis.get("dormant_share"),
        "value_drain_min": analysis.get("value_drain_min"),  # the drained end: the lowest layer's ratio
        # kinds with exact zeros (clipped softmax, softpick): entries above zero, all-zero rows, dead layers; at
        # the end of training and, from the trainer's step-0 record, at initialisation
        **{key: analysis.get(key) for key in ("alive_share", "alive_share_per_layer", "dead_row_share_per_layer",
                                              "dead_layers")},
        "liveness_at_init": liveness_at_init(run_dir),
        "analysis_dir": str(run_dir / "analysis"),
    }


def liveness_at_init(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's step-0 liveness record of a run (``training.trainer.attention_liveness``), or None."""
    try:
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None
    return {k: v for k, v in first.items() if k != "step"} if first.get("step") == 0 else None


def measure_int8(run: RunData, run_dir: Path, scale: Scale) -> dict[str, Any]:
    """Real INT8 (ONNX Runtime, static per tensor, one thread) of one trained run, calibrated on the first
    calibration seed's batches and scored on the same evaluation batches as ``measure``; ``DIR/int8.json`` of
    ``quantizable export`` under ``run_dir/int8``. ORT needs no compilation, which keeps it cheap."""
    from quantizable.export import export_int8

    result = export_int8(run.model, run.calibration(scale.calib_seeds[0]), lambda: run.eval_batches,
                         run_dir / "int8", repeats=5, simulate=False)
    write_json_atomic(run_dir / "int8" / "int8.json", result)
    return result


def measure_ptq(run: RunData, scale: Scale, names: tuple[str, ...]) -> dict[str, Any]:
    """W8A8 under each PTQ baseline (``quantization.ptq``) of one trained run, on the calibration seeds and
    evaluation batches of ``measure``; a method that does not apply records its reason."""
    from quantizable.quantization.ptq import NotApplicable, parse_ptq, simulate_ptq

    results: dict[str, Any] = {}
    for name in names:
        ptq = parse_ptq(name)
        try:
            result = simulate_ptq(run.model, run.calibration, run.eval_batches, ptq, seeds=scale.calib_seeds)
        except NotApplicable as error:
            results[ptq.name] = {"not_applicable": str(error)}
            continue
        results[ptq.name] = {key: result[key] for key in ("fp", "quantized", "ptq", "cost")}
    return results


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


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


def run_job(job: Job, progress: bool = True) -> dict[str, Any]:
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
            write_json_atomic(result_path, measure(run, run_dir, job.scale, job.setup))
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
    return {**json.loads(result_path.read_text()), "int8": json.loads(int8_path.read_text()),
            "run_dir": str(run_dir), "seed": job.seed, **({"curve": curve} if curve is not None else {}),
            **({"ptq": {name: ptq_done[name] for name in job.ptq}} if job.ptq else {})}


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


def _run_all(jobs: list[Job], workers: int, progress: bool, started: float) -> list[dict[str, Any]]:
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


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _layer_mean(runs: list[dict[str, Any]], key: str) -> list[float] | None:
    lists = [r.get(key) for r in runs]
    if any(values is None for values in lists):
        return None
    return [statistics.fmean(v) for v in zip(*lists)]


def _optional_stat(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r.get(key) for r in runs]
    return None if any(v is None for v in values) else _mean_std(values)


def aggregate(task: str, family: str, method: str, runs: list[dict[str, Any]], scale: Scale) -> dict[str, Any]:
    """One results row: mean ± std over training seeds (FP, outliers, mechanism) and over training x calibration
    seeds (W8A8, each bit width of the sweep)."""
    row = {
        "task": task, "family": family, "method": method, "metric": runs[0]["metric"],
        "setup": runs[0]["setup"], "estimators": runs[0]["estimators"],
        "fp": _mean_std([r["fp"] for r in runs]),
        "w8a8": _mean_std([v for r in runs for v in r["w8a8"]["per_seed"]]),
        "int8": _mean_std([r["int8"]["int8"]["metric"] for r in runs]),
        "max_inf_norm": _mean_std([r["max_inf_norm"] for r in runs]),
        "avg_kurtosis": _mean_std([r["avg_kurtosis"] for r in runs]),
        "per_layer_inf_norm": _layer_mean(runs, "per_layer_inf_norm"),
        **{key: _optional_stat(runs, key) for key in (*MECHANISM_KEYS, "dormant_share", "value_drain_min")},
        **{f"{key}_per_layer": _layer_mean(runs, f"{key}_per_layer") for key in MECHANISM_KEYS},
        "bits_sweep": {name: statistics.fmean(v for r in runs for v in r["bits_sweep"][name]) for name in BIT_WIDTHS},
        "bits_sweep_std": {name: _mean_std([v for r in runs for v in r["bits_sweep"][name]])["std"]
                           for name in BIT_WIDTHS},
        "train_seeds": [r["seed"] for r in runs], "calib_seeds": list(scale.calib_seeds),
        "runs": [r["run_dir"] for r in runs], "analysis_dir": runs[0]["analysis_dir"],
    }
    if runs[0].get("alive_share") is not None:  # a kind with exact zeros: was attention alive?
        row["alive_share"] = _mean_std([r["alive_share"] for r in runs])
        row["alive_share_per_layer"] = _layer_mean(runs, "alive_share_per_layer")
        row["dead_layers"] = {r["run_dir"]: r["dead_layers"] for r in runs if r.get("dead_layers")}
        row["dead_layers_at_init"] = {r["run_dir"]: r["liveness_at_init"]["dead_layers"] for r in runs
                                      if (r.get("liveness_at_init") or {}).get("dead_layers")}
    if "ptq" in runs[0]:  # W8A8 under each PTQ baseline, over training x calibration seeds
        row["ptq"] = {name: entry if "not_applicable" in entry else
                      {"w8a8": _mean_std([v for r in runs for v in r["ptq"][name]["quantized"]["per_seed"]]),
                       "cost": entry["cost"]}
                      for name, entry in runs[0]["ptq"].items()}
    if "scores" in runs[0]:  # the task's own metrics (backcopy: copy accuracy, bigram loss)
        row["scores"] = {
            name: {"fp": _mean_std([r["scores"]["fp"][name] for r in runs]),
                   "w8a8": _mean_std([s[name] for r in runs for s in r["scores"]["per_seed"]])}
            for name in runs[0]["scores"]["fp"]
        }
    for key in ("bos_share_copy", "bos_share_other"):  # backcopy: where copying and idle queries look
        if f"{key}_per_layer" in runs[0]:
            row[f"{key}_per_layer"] = _layer_mean(runs, f"{key}_per_layer")
            row[key] = _mean_std([max(r[f"{key}_per_layer"]) for r in runs])
    if "curve" in runs[0]:  # the long scale: quality and quantization cost at every snapshot
        row["curve"] = aggregate_curve([r["curve"] for r in runs])
    if family in TASKS[task].floors:  # the FP quality below which a model has not learnt enough to judge
        metric, minimum = TASKS[task].floors[family]
        value = row["fp"]["mean"] if metric == row["metric"] else row["scores"][metric]["fp"]["mean"]
        row["floor"] = {"metric": metric, "minimum": minimum, "value": value, "met": value >= minimum}
    return row


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
    measured: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for job, result in zip(jobs, _run_all(jobs, workers, progress, started)):
        measured.setdefault((job.task, job.family, job.method), []).append(result)

    rows = [aggregate(task, family, method, runs, scale) for (task, family, method), runs in measured.items()]
    summary = {"scale": scale_name, "setup": setup, "tasks": list(tasks), "overrides": list(overrides), "workers": workers,
               "elapsed_s": round(time.time() - started, 1), "rows": rows}
    write_json_atomic(out / "results.json", rows)
    write_json_atomic(out / "summary.json", summary)
    from quantizable.experiments.report import write_report

    write_report(out, rows, scale_name, overrides)
    return rows
