"""``clipforge demo``: build a real image-text dataset offline, train a small CLIP on it for a time
budget with the real training loop, and measure zero-shot transfer to a style it never saw.

    from clipforge.demo import run_demo, format_results
    result = run_demo("runs/demo", minutes=8)       # about 10 minutes on 2 CPU cores
    print(format_results(result.results))

Steps: (1) ``prepare_demo_data`` installs the registry packages if needed and renders the dataset
(cached; an interrupted build resumes). (2) The thread count is chosen (a core left to the loader
worker, one thread when other programs keep the CPU busy, see :func:`pick_threads`) and a short
calibration run of the real trainer measures samples/s on this machine: the first plan of the step
count. The trainer then re-plans it from the speed it measures (``minutes``, see
:mod:`clipforge.train.budget`), so the run ends within its budget however the machine's speed
drifts; the budget spent is saved with each checkpoint, so a resumed run goes on with what is left. (3) ``clipforge.train.train`` trains, checkpointing about once a minute;
running the demo again on the same run folder resumes from the newest checkpoint, and a run stopped
before its first checkpoint starts again. A folder holding another run (another model, batch size,
step plan or data folder, as ``demo_run.json`` records them) is refused before any work. (4) The
evaluation code scores zero-shot top-1/top-5 on Fluent 3D emoji (a new style) with the bare class
name and with a prompt ensemble, and image-text recall@k on held-out pairs.

Run folder: ``results.json``, ``curves.png`` (loss and temperature, from the trainer),
``predictions.png`` (eval images with their top-3 labels), ``zeroshot/`` (per-class accuracy PNG
and JSON for the ensemble; ``zeroshot_bare/`` for class names alone), ``retrieval.json``,
``model/`` (the final weights, ``clipforge.load("runs/demo/model")``), ``demo_run.json`` (what
identifies the run), and the trainer's ``checkpoints/``, ``metrics.jsonl`` and ``train_config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import write_text_atomic
from ..runtime import log_progress as _log
from .dataset import DemoDataConfig, DemoDataset, demo_data_plan, prepare_demo_data
from .records import with_article
from .report import NOISE_ERRORS, draw_prediction_grid
from .run_folder import RUN_FILE, check_run_folder, saved_progress, training_finished
from .search import index_demo_collections

DEFAULT_MODEL = "demo-rn"  # beat demo-vit on the Fluent 3D set: 35% vs 16% top-1 at equal time
DEFAULT_MINUTES = 8.0
BATCH_SIZE = 64  # contrastive batch; 64 beat 128 in the same minutes (twice the steps, 12.0 vs 9.5 % top-1)
LEARNING_RATE = 1e-3  # peak; small towers trained from scratch take a higher rate than the paper's 5e-4
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.05  # of all steps
CALIBRATION_STEPS = 24  # trainer steps timed to size the run (the first half is warm-up, not timed; 4 timed
# steps of demo-rn, about 0.6 s, misjudged the speed by up to a fifth)
CHECKPOINT_SECONDS = 60  # aim for a checkpoint about this often, so an interruption costs little
EVALUATIONS = 8  # zero-shot and held-out evaluations while training (curves.png), besides the final one
# Prompt ensemble: the caption styles of the training data ("a bagel", "an emoji of a bagel",
# "a picture of a pecan", "a clip art of a crown") and three generic ones. Chosen before looking at
# any score; the class name goes in with its article ("an octopus", "chopsticks").
ENSEMBLE_TEMPLATES = (
    "{}", "{}.", "an emoji of {}", "a picture of {}", "a clip art of {}",
    "an icon of {}", "a drawing of {}", "a 3D render of {}",
)
# ``--quick``: a slice of every source (dataset.QUICK_DATA) and a short fixed run, to check a set-up in a minute.
QUICK_STEPS, QUICK_BATCH = 40, 32
DEFAULT_RUN_DIR, QUICK_RUN_DIR = "runs/demo", "runs/demo-quick"  # a quick check never touches the real run
BUSY_LOAD = 1.0  # 1-minute load average from which other programs count as busy (see pick_threads)
CPU_LOADER_WORKERS = 1  # loader processes on the CPU; pick_threads leaves them a core each


@dataclass
class DemoResult:
    run_dir: Path
    checkpoint: Path  # the final weights as a clipforge model folder (run_dir/model)
    results: dict  # what results.json holds: settings, metrics, timings, files
    dataset: DemoDataset = field(repr=False)


def run_demo(run_dir: str | os.PathLike | None = None, minutes: float = DEFAULT_MINUTES, model: str = DEFAULT_MODEL,
             data_dir: str | os.PathLike | None = None, device: str = "cpu", *, threads: int | str | None = "auto",
             quick: bool = False, steps: int | None = None, batch_size: int | None = None,
             cache_dir: str | os.PathLike | None = None, data_config: DemoDataConfig | None = None,
             install: bool = True, progress: bool = True) -> DemoResult:
    """Prepare the demo data, train ``model`` for about ``minutes`` (or ``steps``), evaluate, write reports.

    ``threads``: torch CPU threads while the demo runs; "auto" times a step with the cores the
    loader worker leaves free and with one and keeps the faster (see :func:`pick_threads`), except for a
    finished run, which is only evaluated; None leaves torch's setting. ``quick``: a data slice
    and a short fixed run. ``steps`` fixes the step count instead of measuring speed, which makes
    a run deterministic. ``run_dir`` defaults to ``runs/demo`` (``runs/demo-quick`` with ``quick``).
    Running again on a run folder resumes unfinished training, or only re-evaluates a finished one;
    a folder holding another run raises :class:`DemoRunFolderError` before any work. Raises
    ``DemoSourceError`` when the sources cannot be installed.
    """
    if steps is None and not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a finite number above 0, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_model(model)
    run_dir = Path(run_dir if run_dir is not None else QUICK_RUN_DIR if quick else DEFAULT_RUN_DIR)
    cache_dir, data_config, data_dir = demo_data_plan(quick, data_dir, cache_dir, data_config)
    if quick:
        steps = steps or QUICK_STEPS
        batch_size = batch_size or QUICK_BATCH
    batch_size = batch_size or BATCH_SIZE
    if isinstance(threads, str) and threads != "auto" or isinstance(threads, int) and threads < 1:
        raise ValueError(f"threads must be a positive number, 'auto' or None, got {threads!r}")
    identity = {"model": model, "data_dir": str(data_dir.resolve()), "batch_size": batch_size, "steps": steps,
                "minutes": None if steps is not None else minutes}
    check_run_folder(run_dir, identity)  # before the data is prepared: a refusal costs nothing
    if threads == "auto" and training_finished(run_dir):
        threads = None  # only evaluation is left: no training step to time; torch's setting evaluates
    saved_threads, load_before = torch.get_num_threads(), _load_average()
    try:
        started = time.perf_counter()
        dataset = prepare_demo_data(cache_dir, data_config, data_dir=data_dir, install=install, progress=progress)
        prepared = time.perf_counter()
        if threads == "auto":  # counted as part of the training budget, like the speed check
            threads = pick_threads(model, batch_size, workers=CPU_LOADER_WORKERS) if device == "cpu" else None
            _log(progress and threads is not None, f"demo: training with {threads} torch thread(s) "
                                                   f"(load average {_load_average()}, {os.cpu_count()} cores)")
        if threads is not None:
            torch.set_num_threads(threads)
        picked = time.perf_counter()
        training, calibrate_seconds = _train(run_dir, dataset, identity, minutes - (picked - prepared) / 60, device,
                                             progress)
        calibrate_seconds += picked - prepared
        trained = time.perf_counter()
        _log(progress, "demo: evaluating")
        results = evaluate_demo(run_dir, dataset, device, progress)
        evaluated = time.perf_counter()
        results["search"] = index_demo_collections(run_dir, dataset, device, progress)
        finished = time.perf_counter()
    finally:
        torch.set_num_threads(saved_threads)
    results = {**training, **results, "device": device,
               # the budget (None for a fixed step count) and what training took of it in this call
               "training_budget_s": None if steps is not None else round(minutes * 60, 1),
               "training_budget_spent_s": round(trained - prepared, 1),
               "threads": torch.get_num_threads() if threads is None else threads,
               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                           "load_average_before": load_before},
               "data": {"dir": str(dataset.root), **dataset.counts},
               "seconds": {"prepare": round(prepared - started, 1), "calibrate": round(calibrate_seconds, 1),
                           "train": round(trained - prepared - calibrate_seconds, 1),
                           "evaluate": round(evaluated - trained, 1), "search_index": round(finished - evaluated, 1),
                           "total": round(finished - started, 1)}}
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return DemoResult(run_dir, run_dir / "model", results, dataset)


def check_model(model: str) -> None:
    """Raise a one-line ``ValueError`` naming the demo presets when ``model`` is not a registered preset."""
    from ..models import available_models

    if model not in available_models():
        others = [name for name in available_models() if name.startswith("demo-") and name != DEFAULT_MODEL]
        raise ValueError(f"unknown model {model!r}; the demo presets are {DEFAULT_MODEL} (the default), "
                         f"{', '.join(others)}; any other preset that `clipforge models` lists also trains")


# ------------------------------------------------------------------------------------- training
def demo_train_config(model: str, train_file: str | os.PathLike, run_dir: str | os.PathLike, steps: int,
                      batch_size: int = BATCH_SIZE, device: str = "cpu"):
    """The demo's :class:`~clipforge.train.config.TrainConfig` for ``steps`` optimizer steps."""
    from ..train.config import TrainConfig

    config = TrainConfig(batch_size=batch_size, steps=steps, device=device, seed=0)
    config.model.name = model
    config.data.train = str(train_file)
    config.data.workers = CPU_LOADER_WORKERS if device == "cpu" else 4  # 64 px PNGs decode fast
    config.data.crop_scale = (0.8, 1.0)
    config.optim.lr = LEARNING_RATE
    config.optim.weight_decay = WEIGHT_DECAY
    config.optim.warmup_steps = max(1, round(WARMUP_FRACTION * steps))
    config.optim.grad_clip_norm = 1.0
    config.run.run_dir = str(run_dir)
    config.run.checkpoint_every = max(1, steps // 4)
    config.run.keep = 1
    config.run.log_every = max(1, min(10, steps // 20))
    return config


def add_demo_evaluation(config, dataset: DemoDataset, evaluations: int = EVALUATIONS) -> None:
    """Evaluate while training: Fluent zero-shot with the prompt ensemble and the held-out pairs
    (recall and loss), ``evaluations`` times over the run, so curves.png shows overfitting."""
    from ..evaluate import load_image_folder

    classes = load_image_folder(dataset.eval_dir).classes
    config.eval.zeroshot = [{"name": "fluent3d", "data": str(dataset.eval_dir), "templates": list(ENSEMBLE_TEMPLATES),
                             "classnames": {name: with_article(name) for name in classes}}]
    config.eval.retrieval = [{"name": "heldout", "data": str(dataset.heldout_captions)}]
    config.eval.times = evaluations  # spread over the re-planned length of a minutes run
    config.eval.batch_size = 256


def pick_threads(model: str, batch_size: int, candidates: tuple[int, ...] | None = None, workers: int = 0) -> int:
    """The torch thread count, of ``candidates`` (default: the cores that ``workers`` loader processes
    leave free, and one), that runs a forward and backward pass of ``model`` fastest; the current
    setting is restored.

    A loader worker needs a core of its own: OpenMP threads that share cores with it wait for each
    other. On 2 cores with one worker the demo trained 505 samples/s with 2 threads and 600-645
    with 1, although its step alone is faster on 2 (952 against 656 samples/s).

    On a machine that other programs keep busy, OpenMP threads that wait for each other can make
    two threads several times slower than one, and the load can rise after any measurement (seen
    here: 2 threads measured faster, then fell from 260 to 20 samples/s when others got busy). So
    without explicit ``candidates``, a 1-minute load average of ``BUSY_LOAD`` or more picks one
    thread, which slows down gracefully; otherwise the faster choice is measured.
    """
    from ..models import CLIP, get_config

    saved = torch.get_num_threads()
    load = _load_average()
    if candidates is None and load is not None and load >= BUSY_LOAD:
        return 1
    candidates = candidates or tuple(sorted({max(1, saved - workers), 1}, reverse=True))
    if len(candidates) == 1:
        return candidates[0]
    config = get_config(model)
    generator = torch.Generator().manual_seed(0)  # the global RNG is left alone
    size, rows = config.vision.image_size, min(batch_size, 64)
    images = torch.randn(rows, 3, size, size, generator=generator)  # (rows, 3, H, W)
    tokens = torch.zeros(rows, min(16, config.text.context_length), dtype=torch.long)  # (rows, L): a typical caption
    tokens[:, 1:-1] = torch.randint(1, 49000, (rows, tokens.shape[1] - 2), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text
    network = CLIP(config).train()
    timings = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            seconds = []
            for _ in range(3):  # the first pass warms up allocations and is not counted
                start = time.perf_counter()
                loss = network.encode_image(images).square().mean() + network.encode_text(tokens).square().mean()
                loss.backward()
                seconds.append(time.perf_counter() - start)
            timings[threads] = min(seconds[1:])
    finally:
        torch.set_num_threads(saved)
    return min(timings, key=timings.get)


def measure_speed(config, run_dir: Path, progress: bool = True) -> tuple[float, float]:
    """``(samples/s, start-up seconds)`` of ``config`` from a short run of the real trainer in ``run_dir``.

    The first half of the steps warms up (allocations, worker start); the second half is timed.
    """
    from ..train.main import train

    half = CALIBRATION_STEPS // 2
    probe = dataclasses.replace(config, steps=CALIBRATION_STEPS)
    probe.run = dataclasses.replace(config.run, run_dir=str(run_dir), log_every=half, checkpoint_every=10**9,
                                    progress=False, resume=None)
    probe.optim = dataclasses.replace(config.optim, warmup_steps=half)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    try:
        train(probe)
        from ..train.log import read_metrics

        timed = [r["samples_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step") == CALIBRATION_STEPS]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    samples_per_s = timed[-1]
    startup = max(0.0, time.perf_counter() - started - CALIBRATION_STEPS * config.batch_size / samples_per_s)
    _log(progress, f"demo: {samples_per_s:.0f} samples/s on this machine, {startup:.0f} s to start a run")
    return samples_per_s, startup


def _train(run_dir: Path, dataset: DemoDataset, identity: dict, minutes: float, device: str,
           progress: bool) -> tuple[dict, float]:
    """Train (or resume, or skip a finished run) the run ``identity`` describes (``check_run_folder``
    has accepted the folder); returns what results.json records about it and the seconds the speed
    check took."""
    from ..checkpoints import load_model, save
    from ..train.resume import list_checkpoints
    from ..train.config import TrainConfig
    from ..train.main import CONFIG_FILE, train
    from ..train.log import read_metrics
    from ..train.run_folder import stopped_before_first_checkpoint

    model, steps, batch_size = identity["model"], identity["steps"], identity["batch_size"]
    saved_path = run_dir / CONFIG_FILE
    found = list_checkpoints(run_dir)
    calibrate_seconds, samples_per_s, resumed_from, saved_state = 0.0, None, None, None
    if found:
        saved_state = saved_progress(found[-1])
        config = TrainConfig.from_dict(json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file()
                                       else saved_state["config"])
        resumed_from = saved_state["step"]
    else:
        write_text_atomic(run_dir / RUN_FILE, json.dumps(identity, indent=2) + "\n")
        if steps is None:
            started = time.perf_counter()
            _log(progress, f"demo: measuring training speed ({CALIBRATION_STEPS} steps of {model})")
            probe = demo_train_config(model, dataset.train_captions, run_dir, 10**6, batch_size, device)
            samples_per_s, startup = measure_speed(probe, run_dir / "calibration", progress)
            calibrate_seconds = round(time.perf_counter() - started, 1)
            budget = minutes * 60 - calibrate_seconds - startup
            # The first plan (3 % of the time for checkpoints, 5 % for the evaluations while training);
            # the trainer re-plans it from the speed it measures, to end within the budget.
            steps = max(1, math.floor(0.92 * budget * samples_per_s / batch_size))
        config = demo_train_config(model, dataset.train_captions, run_dir, steps, batch_size, device)
        add_demo_evaluation(config, dataset)
        if samples_per_s:
            config.minutes = max(budget, 1.0) / 60
            config.run.checkpoint_every = max(10, round(CHECKPOINT_SECONDS * samples_per_s / batch_size))
    planned_epochs = config.steps * config.batch_size / dataset.counts["train_images"]
    finished_before = saved_state is not None and saved_state["finished"]
    if finished_before:
        _log(progress, f"demo: training already finished in {run_dir} ({resumed_from} steps); evaluating again")
    else:
        if saved_state is not None:
            config.run.resume = "latest"
            left = (f" ({max(0.0, config.minutes - saved_state['spent_s'] / 60):.1f} of its {config.minutes:.1f} "
                    "minutes left)" if config.minutes and saved_state["spent_s"] is not None else "")
            _log(progress, f"demo: resuming {run_dir} at step {resumed_from} of {saved_state['total_steps']}{left}")
        else:
            _log(progress and stopped_before_first_checkpoint(run_dir), f"demo: {run_dir} stopped before its first "
                 "checkpoint: starting it again (its logs move into replaced-*/)")
            planned = f"about {config.minutes:.1f} minutes, planned at " if config.minutes else ""
            _log(progress, f"demo: training {model} for {planned}{config.steps} steps of {config.batch_size} pairs "
                           f"({planned_epochs:.1f} epochs) in {run_dir}")
        config.run.progress = progress
        train(config, overwrite=saved_state is None)  # no checkpoint (a Ctrl-C before it): nothing to resume
    final = list_checkpoints(run_dir)[-1]
    save(load_model(final), run_dir / "model")  # weights only: the folder a user loads
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and math.isfinite(r["loss"])]
    steps_done = int(final.name.removeprefix("step_"))
    epochs = steps_done * config.batch_size / dataset.counts["train_images"]
    return {"model": model, "steps": steps_done, "planned_steps": config.steps, "batch_size": config.batch_size,
            "epochs": round(epochs, 2),
            "measured_samples_per_s": samples_per_s and round(samples_per_s, 1), "resumed_from_step": resumed_from,
            "trained_by_earlier_call": finished_before,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}, calibrate_seconds


# ----------------------------------------------------------------------------------- evaluation
def evaluate_demo(run_dir: str | os.PathLike, dataset: DemoDataset, device: str = "cpu", progress: bool = True) -> dict:
    """Zero-shot (bare names and the ensemble) and retrieval scores of ``run_dir/model``; writes the reports."""
    from ..checkpoints import load
    from ..evaluate import (evaluate_retrieval, evaluate_zeroshot, load_image_folder, load_retrieval_data,
                            paired_difference)
    from ..evaluate.report import write_json, write_zeroshot_report

    run_dir = Path(run_dir)
    model, preprocess = load(run_dir / "model", device=device)
    cache = run_dir / "eval_cache"  # image features are computed once for both prompt sets
    eval_data = load_image_folder(dataset.eval_dir)
    articled = {name: with_article(name) for name in eval_data.classes}
    zeroshot, hits = {}, {}
    for mode, classnames, templates in (("bare", None, None), ("ensemble", articled, list(ENSEMBLE_TEMPLATES))):
        result = evaluate_zeroshot(model, eval_data, classnames=classnames, templates=templates, preprocess=preprocess,
                                   batch_size=256, device=device, cache_dir=cache, progress=False)
        write_zeroshot_report(result.to_report(), run_dir / ("zeroshot" if mode == "ensemble" else "zeroshot_bare"))
        zeroshot[mode] = {key: round(value, 4) for key, value in result.metrics.items()}
        hits[mode] = torch.zeros(len(eval_data.paths), dtype=torch.bool)  # (images,) top-1 right, by image
        hits[mode][result.indices] = result.logits.argmax(-1) == result.targets
    zeroshot["ensemble"]["templates"] = list(ENSEMBLE_TEMPLATES)
    margin, margin_error = paired_difference(hits["ensemble"], hits["bare"])
    zeroshot["ensemble_minus_bare"] = {"top1": round(margin, 4), "paired_standard_error": round(margin_error, 4),
                                       "beyond_noise": margin > NOISE_ERRORS * margin_error}
    draw_prediction_grid(eval_data, result, run_dir / "predictions.png")
    retrieval = evaluate_retrieval(model, load_retrieval_data(dataset.heldout_captions), preprocess=preprocess,
                                   device=device, cache_dir=cache, progress=False)
    write_json(retrieval, run_dir / "retrieval.json")
    shutil.rmtree(cache, ignore_errors=True)
    chance = 1 / len(eval_data.classes)
    return {
        "zeroshot": {"classes": len(eval_data.classes), "images": len(eval_data.paths), "chance": round(chance, 4),
                     **zeroshot},
        "floor": {"top1_needed": round(20 * chance, 4), "met": zeroshot["ensemble"]["top1"] >= 20 * chance,
                  "ensemble_beats_bare": zeroshot["ensemble"]["top1"] > zeroshot["bare"]["top1"]},
        "retrieval": {"images": retrieval["num_images"], "texts": retrieval["num_texts"],
                      **{key: round(value, 4) for key, value in retrieval["metrics"].items()}},
        "files": {"results": "results.json", "loss_curve": "curves.png", "predictions": "predictions.png",
                  "per_class_accuracy": "zeroshot/per_class_accuracy.png", "zeroshot_report": "zeroshot/report.json",
                  "zeroshot_bare_report": "zeroshot_bare/report.json", "retrieval_report": "retrieval.json",
                  "model": "model"},
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None

