"""Train CLIP: ``train(config) -> TrainResult``, the library entry point behind ``clipforge train``.

The same entry point runs as one process or as many under torchrun, which sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; rank 0 alone prints and writes. ``--batch-size`` is the
contrastive batch of all processes together, so changing the number of GPUs changes the speed,
not the result.

One process (CPU, or one GPU)::

    clipforge train --preset tiny --data pairs.csv --run-dir runs/tiny

One node with 8 GPUs::

    torchrun --nproc_per_node=8 -m clipforge.cli train --preset paper_vit_b32 \\
        --data '/data/laion-{00000..09999}.tar' --run-dir runs/b32

Several nodes: the same command on every node, all pointing at one rendezvous host; the run
folder must be on a filesystem every node sees (checkpoints are written by rank 0 and read by
all when resuming)::

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=b32 --rdzv_backend=c10d \\
        --rdzv_endpoint=node0.example:29500 -m clipforge.cli train --preset paper_vit_b32 \\
        --data '/shared/laion-{00000..09999}.tar' --run-dir /shared/runs/b32

Resume any of them after a crash or a kill by adding ``--resume latest`` to the same command.

From Python::

    from clipforge.train import TrainConfig, train
    config = TrainConfig(batch_size=64, steps=100)
    config.data.train = "pairs.csv"
    result = train(config)
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoints import load_model
from ..data import open_dataset, plan_lanes
from ..files import write_text_atomic
from ..loss import SIGLIP_INIT_LOGIT_SCALE, Objective
from ..models import CLIP, available_models, get_config
from ..models.config import check_patch_dropout
from ..runtime import autocast_dtype, retain_freed_memory
from ..tokenizer import tokenize
from ..transforms import image_transform
from .resume import rank_stream_seed, read_training_state, resolve_resume, set_rng_state
from .run_folder import RunFolderLock, check_fresh_start, remove_leftovers, set_aside_later, start_over
from .config import TrainConfig, validate
from .distributed_setup import DistributedContext, cleanup_distributed, init_distributed, read_environment
from .evaluation import PeriodicEvaluation
from .loop import Run, TrainingStopped, TrainResult, data_lanes, epoch_loader, run_loop
from .optim import build_optimizer, build_scheduler, sparse_token_gradients

CONFIG_FILE = "train_config.json"  # the resolved config, saved in the run folder

__all__ = ["CONFIG_FILE", "TrainResult", "TrainingStopped", "train"]


def train(config: TrainConfig, overwrite: bool = False) -> TrainResult:
    """Train (or fine-tune, or resume) the run ``config`` describes; see the module docstring.

    Configuration errors raise ``ValueError`` / ``FileNotFoundError`` before any work; a run that
    stops itself (non-finite steps, too many bad samples) raises :class:`TrainingStopped`. A new
    run refuses a folder that holds one unless ``overwrite`` (the old files are moved aside), and
    a folder another live training holds (:mod:`clipforge.train.run_folder`).
    """
    context = read_environment(config.device)
    validate(config, context.world_size, context.device.type)
    if context.device.type == "cpu":
        retain_freed_memory()  # no page faults re-mapping each step's activations
    if config.model.init_checkpoint is None:  # unknown model, or patch dropout on a ResNet: fail now
        check_patch_dropout(config.model.patch_dropout, get_config(config.model.name).vision.is_resnet)
    if config.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("run.tensorboard is set but the tensorboard package is missing: pip install tensorboard")
    dataset = open_dataset(list(config.data.sources) or config.data.train, image_root=config.data.image_root,
                           image_key=config.data.image_key, caption_key=config.data.caption_key,
                           weights=list(config.data.weights) or None, resampled=config.data.resampled)
    if overwrite and config.run.resume:
        raise ValueError("--overwrite starts the run again and --resume continues it: pass one of them")
    resume = resolve_resume(config.run.run_dir, config.run.resume) if config.run.resume else None
    if resume is None:
        check_fresh_start(config.run.run_dir, overwrite)
    lock = RunFolderLock(config.run.run_dir).acquire() if context.is_main else None
    joined = False
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        joined = init_distributed(context)
        if context.is_main:
            remove_leftovers(config.run.run_dir)  # temporary checkpoints of dead processes
            if overwrite:
                start_over(config.run.run_dir)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
        run = _build_run(config, context, dataset, resume)
        if resume is not None:
            _restore(run, resume)
            _check_steps_left(run, resume)
            if context.is_main:
                _set_aside_abandoned(config.run.run_dir, run.step)
        elif context.is_main:
            Path(config.run.run_dir).mkdir(parents=True, exist_ok=True)
        if context.is_main:
            write_text_atomic(Path(config.run.run_dir) / CONFIG_FILE,
                              json.dumps(_as_trained(config, run.model), indent=2) + "\n")
        result = run_loop(run)
        if joined:
            dist.barrier()  # every rank is done before any of them tears its connections down
        return result
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if joined:
            cleanup_distributed()
        if lock is not None:
            lock.release()


def _set_aside_abandoned(run_dir: str | os.PathLike, step: int) -> None:
    """Resuming from an earlier checkpoint abandons the steps after it: move their checkpoints aside
    (and copy the logs as they were) so the folder holds one history; a one-line notice says where."""
    moved = set_aside_later(run_dir, step)
    if moved is not None:
        aside, later = moved
        names = ", ".join(path.name for path in later)
        print(f"note: resuming at step {step}: the later checkpoints of the abandoned run ({names}) were moved, "
              f"with a copy of its logs, into {aside}", file=sys.stderr)


def _as_trained(config: TrainConfig, model: CLIP) -> dict:
    """The config to save: with ``--init``, ``model.name`` names the checkpoint's architecture."""
    saved = config.to_dict()
    if config.model.init_checkpoint:
        saved["model"]["name"] = _preset_name_of(model.config) or f"architecture of {config.model.init_checkpoint}"
    return saved


def _preset_name_of(model_config) -> str | None:
    """The registered model preset whose config is exactly ``model_config``, if any."""
    return next((name for name in available_models() if get_config(name) == model_config), None)


def _check_steps_left(run: Run, checkpoint: Path) -> None:
    """Resuming at or past the last step would train nothing and write nothing: say so."""
    if run.step >= run.total_steps and run.config.minutes is not None:
        raise ValueError(f"cannot resume {checkpoint}: the run ended at step {run.step}, at the end of its "
                         f"{run.config.minutes:g} minutes; pass a larger --minutes to train further")
    if run.step >= run.total_steps:
        raise ValueError(f"cannot resume {checkpoint}: the run is at step {run.step} and --steps asks for "
                         f"{run.total_steps} in all; pass --steps above {run.step} to train further")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(config: TrainConfig, device: torch.device, resume: Path | None = None) -> CLIP:
    """The model to train: a preset with random weights, or ``model.init_checkpoint``'s weights.

    When resuming, the weights come from the checkpoint ``resume`` alone (read by
    :func:`clipforge.load_model`), never from the initial weights first. Applies gradient
    checkpointing, patch dropout and tower locking; the model is fp32 (autocast handles bf16 and fp16) and in
    training mode, except for a locked image tower, which stays in eval mode.
    """
    section = config.model
    if resume is not None:
        model = load_model(resume)
    elif section.init_checkpoint:
        model = load_model(section.init_checkpoint)
    else:
        model = CLIP(get_config(section.name))
        if config.loss.kind == "siglip":
            with torch.no_grad():
                model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
    model = model.float()
    model.set_patch_dropout(section.patch_dropout)  # ViT only; a ResNet refuses a non-zero share
    if section.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if section.lock_image:
        model.lock_image_tower()
    if section.lock_text:
        model.lock_text_tower()
    return model.to(device).train()


def _compile(model: CLIP) -> None:
    """Compile the two encoders in place (the state dict and checkpoints are unaffected).

    Text stays trimmed to each batch's longest caption: the second length seen recompiles once
    with a dynamic length (dynamo's automatic dynamic shapes), and that graph serves every later
    length (ViT-B/32 on the CPU: 1.06-1.09x the eager step; untrimmed 77 tokens it was 0.69x).
    Length groups stay off: each group would be one more shape to compile.
    """
    model.text_length_groups = 1
    model.encode_image = torch.compile(model.encode_image)
    model.encode_text = torch.compile(model.encode_text)


def _use_channels_last(setting: "bool | None", model: CLIP, device: torch.device) -> bool:
    """Whether the image tower runs channels-last: ``model.channels_last``, or by default ResNets on CPU."""
    if not model.config.vision.is_resnet:
        return False
    return device.type == "cpu" if setting is None else bool(setting)


def _build_run(config: TrainConfig, context: DistributedContext, dataset, resume: Path | None) -> Run:
    if config.deterministic:
        torch.backends.cudnn.benchmark = False
    _seed_everything(config.seed)  # the same initial weights on every process
    model = build_model(config, context.device, resume)
    if context.world_size > 1:  # make sure, whatever the init did on each device
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        # From here each process draws its own random stream (patch-dropout masks): with the shared
        # init seed, the images in the same slot on every process would get the same mask.
        torch.manual_seed(int(np.random.SeedSequence([config.seed, context.rank]).generate_state(1)[0]))
    if _use_channels_last(config.model.channels_last, model, context.device):
        model.visual.to(memory_format=torch.channels_last)  # same values; convolutions run faster
    if config.model.compile:
        _compile(model)
    else:  # compiled graphs keep the dense embedding backward
        sparse_token_gradients(model)
    objective = Objective(config.loss.kind, config.loss.tile_size).to(context.device)
    optimizer = build_optimizer([model, objective], config.optim)
    context_length = model.config.text.context_length
    run = Run(
        config=config, context=context, model=model, objective=objective, optimizer=optimizer,
        scheduler=None, scaler=torch.amp.GradScaler(context.device.type, enabled=config.precision == "fp16"),
        dataset=dataset,
        preprocess=image_transform(model.config.vision.image_size, train=True, scale=config.data.crop_scale,
                                   hflip=config.data.hflip),
        tokenize=partial(tokenize, context_length=context_length, truncate=True),
        total_steps=0, autocast_dtype=autocast_dtype(config.precision),
    )
    if config.eval.zeroshot or config.eval.retrieval:
        run.evaluation = PeriodicEvaluation(config.eval, config.batch_size, context, objective=objective)
    steps_per_epoch = epoch_loader(run, 0).num_batches  # also fails now if the data cannot fill a batch
    run.total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    run.scheduler = build_scheduler(optimizer, config.optim.warmup_steps, lambda: run.total_steps)  # re-planned
    return run


def _restore(run: Run, checkpoint: Path) -> None:
    """Load optimizer, schedule, scaler, RNG and data position from ``checkpoint`` (the weights
    were loaded from it when the model was built)."""
    state = read_training_state(checkpoint)
    saved = TrainConfig.from_dict(state["config"])
    now = run.config
    checks = [
        ("batch_size", saved.batch_size, now.batch_size),
        ("data.train", saved.data.train, now.data.train),
        ("data.sources", saved.data.sources, now.data.sources),
        ("data.weights", saved.data.weights, now.data.weights),
        ("data.resampled", saved.data.resampled, now.data.resampled),
        ("seed", saved.seed, now.seed),
    ]
    for name, before, after in checks:
        if before != after:
            raise ValueError(f"cannot resume {checkpoint}: its {name} was {before!r}, now {after!r}; "
                             "the data order depends on it, so resume with the same value")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler.is_enabled() and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.objective.load_state_dict(state["objective"])
    run.step, run.epoch, run.epoch_batch = state["step"], state["epoch"], state["epoch_batch"]
    # Caption files: global batch b is the same on any world size, so epoch_batch carries over.
    # Shards: the split depends on the world size and workers; on other values, the rest of the
    # epoch is planned over the samples not yet taken (none repeated or skipped, order differs).
    run.epoch_stages = [list(stage) for stage in state.get("epoch_stages", [])]
    saved_lanes = state.get("lanes", plan_lanes(run.dataset, saved.data.workers))
    if run.dataset.sequential and (state["world_size"], saved_lanes) != (run.context.world_size, data_lanes(run)):
        run.epoch_stages.append([state["world_size"], saved_lanes, run.epoch_batch])
        run.epoch_batch = 0
    run.nonfinite_in_row = state["nonfinite_in_row"]
    if now.minutes is not None and state.get("budget_spent_s") is not None:  # the same budget goes on
        run.budget_spent = state["budget_spent_s"]
        # a finished run given more minutes plans its next stretch like a new run, then re-plans
        more_minutes = state["total_steps"] <= run.step and now.minutes > (saved.minutes or 0)
        run.total_steps = run.step + run.total_steps if more_minutes else state["total_steps"]
    rng = state["rng"]
    if len(rng) == run.context.world_size:  # the same processes: each continues its own streams exactly
        set_rng_state(rng[run.context.rank])
    else:  # one state per process of the run that wrote it: derive a distinct stream for each rank
        _seed_everything(rank_stream_seed(now.seed, run.context.rank, run.step))
