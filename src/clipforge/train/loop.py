"""The training loop: batches in, optimizer steps out, with checkpoints, metrics and safety stops.

Each step embeds this process's share of the contrastive batch (in chunks when ``chunk_size`` is
set, see :mod:`clipforge.train.grad_cache`), computes the loss of the global batch, averages the
gradients over processes, and updates the weights. Then ``logit_scale`` is clamped so the
temperature never exceeds 100. A step whose loss or gradient is not finite changes nothing but
the counters; after ``run.max_nonfinite_in_row`` of them in a row the run stops with
:class:`TrainingStopped`, leaving the last checkpoint as it was.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..data import TooManyBadSamples, make_train_loader, plan_lanes, remaining_positions
from ..distributed import OverlappedGradientAverager, all_reduce_sum, average_gradients
from ..loss import clamp_logit_scale_
from .budget import TimeBudget
from .resume import list_checkpoints, rng_state, save_checkpoint
from .config import TrainConfig
from .distributed_setup import DistributedContext
from .grad_cache import contrastive_step
from .optim import gradient_norm_
from .log import MetricsLog, plot_curves

STATE_FORMAT = 2  # version of the state.pt layout written by this loop (2: global batches, epoch_stages)
SHUFFLE_BLOCK = 1024  # samples shuffled together within a worker's run of shards


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps or bad samples); the message says why."""


@dataclass
class TrainResult:
    run_dir: Path  # the run folder
    steps: int  # optimizer steps done, counting those before a resume
    final_loss: float  # loss of the last step (nan when it was not finite)
    losses: list[float]  # loss of every step this call ran
    checkpoint: Path | None  # newest checkpoint written by this call (rank 0), else None
    skipped_steps: int  # steps skipped for a non-finite loss or gradient in this call
    skipped_samples: int  # bad samples dropped on this process in this call
    is_main: bool  # rank 0, the process that printed and saved


@dataclass
class Run:
    """Everything the loop needs, built by :func:`clipforge.train.main.train`."""

    config: TrainConfig
    context: DistributedContext
    model: nn.Module  # the CLIP model (encode functions possibly compiled)
    objective: nn.Module  # the loss, with its own parameters (SigLIP's bias)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # set once total_steps is known
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    dataset: object  # from clipforge.data.open_dataset
    preprocess: Callable  # PIL image -> (3, H, W)
    tokenize: Callable  # captions -> (n, L)
    total_steps: int  # optimizer steps of the whole run
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 for the encoders; None: fp32
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    epoch_batch: int = 0  # index in its epoch of the next batch
    nonfinite_in_row: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    evaluation: Callable | None = None  # a train.evaluation.PeriodicEvaluation when the config lists eval sets
    # Shards only: (world_size, lanes, batches_done) of earlier stretches of this epoch run on another
    # world size or worker count; the rest of the epoch is planned over the samples they left.
    epoch_stages: list[list[int]] = field(default_factory=list)
    budget_spent: float = 0.0  # ``minutes`` runs: seconds of the budget used before this session (a resume)
    budget: TimeBudget | None = None  # ``minutes`` runs: re-plans total_steps while the loop runs
    params: list[nn.Parameter] = field(init=False)  # trainable: model's, then the objective's
    norm_buffers: list[torch.Tensor] = field(init=False)  # BatchNorm statistics, put back after a bad step
    grad_sync: OverlappedGradientAverager | None = field(init=False)  # several processes: all-reduce in backward

    def __post_init__(self):
        self.params = [p for m in (self.model, self.objective) for p in m.parameters() if p.requires_grad]
        self.grad_sync = OverlappedGradientAverager(self.params) if self.context.world_size > 1 else None
        self.norm_buffers = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for b in m.buffers() if b.is_floating_point()]

    @property
    def per_rank_batch(self) -> int:
        return self.config.batch_size // self.context.world_size


def epoch_loader(run: Run, epoch: int, start_batch: int = 0):
    """This process's loader over ``epoch``, starting at batch ``start_batch``.

    When ``run.epoch_stages`` is set (a shard epoch resumed on another world size), the loader
    covers only the samples those stages did not take.
    """
    positions = None
    if run.epoch_stages and epoch == run.epoch:
        samples = len(run.dataset.epoch_view(epoch, run.config.seed))  # resampled epochs differ in length
        positions = remaining_positions(samples, run.config.batch_size, run.epoch_stages,
                                        block=SHUFFLE_BLOCK, seed=run.config.seed, epoch=epoch)
    return make_train_loader(
        run.dataset, run.preprocess, run.tokenize, run.per_rank_batch, epoch=epoch, seed=run.config.seed,
        rank=run.context.rank, world_size=run.context.world_size, num_workers=run.config.data.workers,
        start_batch=start_batch, max_skip_fraction=run.config.data.max_skip_fraction,
        pin_memory=run.context.device.type == "cuda", shuffle_block=SHUFFLE_BLOCK, positions=positions,
        draft_size=draft_size(run.model.config.vision.image_size, run.config.data.crop_scale[0]),
    )


def draft_size(image_size: int, min_crop_area: float) -> int:
    """Smallest decoded side that keeps every random crop at or above the model's input resolution.

    The smallest crop covers ``min_crop_area`` of the image at aspect ratios up to 4/3, so its
    short side is at least sqrt(min_crop_area * 3/4) of the image's; decoding JPEGs with PIL's
    draft mode down to ``image_size`` over that never upsamples a crop that full decoding would not.
    """
    return math.ceil(image_size / math.sqrt(min_crop_area * 3 / 4))


def data_lanes(run: Run) -> int:
    """Lanes of this run's epoch plan (shards: one per worker; caption files: one)."""
    return plan_lanes(run.dataset, run.config.data.workers)


def _smallest(value: int, context: DistributedContext) -> int:
    """The minimum of ``value`` over all processes (``value`` itself on one process)."""
    if context.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


_END, _FAILED = -1, -2  # row counts that signal the end of the epoch / a data error


def _next_batch(run: Run, batches: Iterator):
    """The next batch, trimmed so every process has the same rows, or None at the end of the epoch.

    Bad samples shrink a batch; the gathered loss needs equal rows on every process, so all take
    the smallest count (a few good pairs sit out that step). A data error on any process stops all.
    """
    error = None
    try:
        batch = next(batches)
        rows = len(batch)
    except StopIteration:
        batch, rows = None, _END
    except TooManyBadSamples as err:
        batch, rows, error = None, _FAILED, err
    agreed = _smallest(rows, run.context)
    if agreed == _FAILED:
        message = str(error) if error else "another process stopped on too many bad samples (see its log)"
        raise TrainingStopped(message) from error
    if agreed == _END:
        return None, 0
    return batch, agreed


def _optimizer_step(run: Run, images: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float, bool]:
    """One contrastive step; returns (loss, gradient norm, whether it was skipped as non-finite)."""
    model, objective, optimizer, scaler = run.model, run.objective, run.optimizer, run.scaler
    saved_norm_stats = [b.clone() for b in run.norm_buffers]
    # One backward (no chunks): gradients are all-reduced in buckets while backward runs. Chunks
    # accumulate several backwards per parameter, so they are averaged once at the end.
    chunk_size = run.config.chunk_size
    overlap = run.grad_sync is not None and (chunk_size is None or chunk_size >= images.shape[0])
    if run.grad_sync is not None:
        run.grad_sync.active = overlap
    loss, _ = contrastive_step(
        model, images, tokens, lambda image, text: objective(image, text, model.logit_scale),
        chunk_size, autocast_dtype=run.autocast_dtype,
        scale_loss=scaler.scale if scaler.is_enabled() else None,
    )
    if overlap:
        run.grad_sync.finish()  # every process now holds the gradient of the global batch
    else:
        average_gradients(run.params)
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norm = float(gradient_norm_(run.params, run.config.optim.grad_clip_norm))
    loss_value = float(loss)
    if scaler.is_enabled():
        # The scaler skips steps with overflowing gradients and lowers the scale: that is how it
        # calibrates, so only a non-finite loss counts as a bad step under fp16.
        scaler.step(optimizer)
        scaler.update()
        nonfinite = not math.isfinite(loss_value)
    else:
        nonfinite = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if not nonfinite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if nonfinite:  # BatchNorm statistics updated by the bad forward pass are put back
        for buffer, saved in zip(run.norm_buffers, saved_norm_stats):
            buffer.copy_(saved)
    clamp_logit_scale_(model.logit_scale)
    run.scheduler.step()
    return loss_value, grad_norm, nonfinite


def _save(run: Run, last_path: Path | None) -> Path | None:
    """Checkpoint the current step (rank 0 writes; every process contributes its RNG state).

    Weights that are not all finite are never written: the run stops instead (the weights are the
    same on every process, so all stop together).
    """
    if not all(bool(torch.isfinite(t).all()) for t in run.model.state_dict().values() if t.is_floating_point()):
        raise TrainingStopped(
            f"stopped at step {run.step}: the weights are no longer finite after the update, so they were not "
            f"saved. {_before_divergence(run, run.step + 1)}. Try a lower optim.lr or optim.grad_clip_norm")
    rng_states = [rng_state()]
    if run.context.world_size > 1:
        rng_states = [None] * run.context.world_size
        dist.all_gather_object(rng_states, rng_state())
    if not run.context.is_main:
        return last_path
    state = {
        "format": STATE_FORMAT,
        "step": run.step,
        "epoch": run.epoch,
        "epoch_batch": run.epoch_batch,
        "epoch_offset": run.epoch_batch * run.config.batch_size,  # samples of the epoch consumed
        "world_size": run.context.world_size,
        "lanes": data_lanes(run),
        "epoch_stages": [list(stage) for stage in run.epoch_stages],
        "nonfinite_in_row": run.nonfinite_in_row,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "objective": run.objective.state_dict(),
        "rng": rng_states,
        "config": run.config.to_dict(),
        "total_steps": run.total_steps,  # a ``minutes`` run's plan at this step
        "budget_spent_s": run.budget.spent() if run.budget else None,
    }
    return save_checkpoint(run.config.run.run_dir, run.model, state, run.step, run.config.run.keep)


class _Progress:
    """What the run reports: rank 0's progress bar and metrics log, everyone's counters.

    Every process calls :meth:`record` at every step, because logging steps sum the skipped-sample
    counts over processes.
    """

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        config, self.context = run.config, run.context
        self.run_dir, self.log_every = config.run.run_dir, config.run.log_every
        main = self.context.is_main
        self.log = MetricsLog(self.run_dir, config.run.tensorboard, resume_step=run.step) if main else None
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not (main and config.run.progress),
                        unit="step", dynamic_ncols=True)
        self.losses: list[float] = []  # every step's loss
        self.skipped_steps = self.skipped_samples = 0  # this call's non-finite steps, this process's bad samples
        self.interval_losses: list[float] = []  # finite losses since the last metrics line
        self.interval_samples, self.samples_per_s = 0, 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing throughput now (after a checkpoint, so saving does not count as training)."""
        self.interval_start = time.perf_counter()

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        self.skipped_steps += 1
        if self.log:
            self.log.log(step, {"event": "nonfinite_step", "loss_value": str(loss), "grad_norm": str(grad_norm)})
            self.bar.write(f"step {step}: non-finite loss or gradient ({loss}, {grad_norm}); step skipped")

    def evaluated(self, step: int, values: dict) -> None:
        """Log evaluation results (rank 0 has them); a failed set is a warning, not a stop."""
        if self.log and values:
            self.log.log(step, values)
            for key, value in values.items():
                if key.endswith("/error"):
                    self.bar.write(f"step {step}: evaluation of {key[5:-6]} failed: {value}")
        self.restart_clock()  # evaluating does not count as training time

    def record(self, run: Run, loss: float, lr: float, grad_norm: float, rows: int) -> None:
        """Account for the step just taken; every ``log_every`` steps, write a metrics line."""
        self.losses.append(loss)
        if math.isfinite(loss):
            self.interval_losses.append(loss)
        self.interval_samples += rows * self.context.world_size
        scale = float(run.model.logit_scale.detach().exp())
        if run.step % self.log_every == 0 or run.step == run.total_steps:
            self.samples_per_s = self.interval_samples / max(time.perf_counter() - self.interval_start, 1e-9)
            skipped = all_reduce_sum(torch.tensor([self.skipped_samples], device=self.context.device))
            if self.log:
                self.log.log(run.step, {
                    "epoch": run.epoch,
                    "loss": sum(self.interval_losses) / len(self.interval_losses) if self.interval_losses else math.nan,
                    "lr": lr, "logit_scale": scale, "grad_norm": grad_norm, "samples_per_s": self.samples_per_s,
                    "skipped_samples": int(skipped.item()), "skipped_steps": self.skipped_steps,
                })
            self.interval_samples, self.interval_losses = 0, []
            self.restart_clock()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", scale=f"{scale:.1f}",
                             samples_per_s=f"{self.samples_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def close(self, failing: bool = False) -> None:
        """Close the bar and log and draw the curves; a failed plot (full disk) never hides the run's
        own error, and after a good run it is a warning: the checkpoints are what matters."""
        self.bar.close()
        if self.log:
            self.log.close()
            try:
                plot_curves(self.run_dir)
            except OSError as err:
                if not failing:
                    print(f"warning: curves not drawn: {err}", file=sys.stderr)


def _before_divergence(run: Run, first_bad_step: int) -> str:
    """Name the newest checkpoint written before step ``first_bad_step``, the first that failed.

    A checkpoint of the step just before holds the weights that gave the first non-finite loss:
    they may be the cause (an update that blew them up), so the one before it is named too.
    """
    found = [(int(path.name.rsplit("_", 1)[1]), path) for path in list_checkpoints(run.config.run.run_dir)]
    before = [(step, path) for step, path in found if step < first_bad_step]
    if not before:
        return f"No checkpoint from before the divergence (it began at step {first_bad_step})"
    step, path = before[-1]
    message = f"Last checkpoint from before the divergence: {path}"
    if step == first_bad_step - 1:
        earlier = f"use {before[-2][1]}" if len(before) > 1 else "there is no earlier checkpoint"
        message += (f" (its weights gave the first non-finite loss, at step {first_bad_step}; if a resume from it "
                    f"diverges again, {earlier})")
    return message


def _stop_if_too_many_nonfinite(run: Run, loss: float, grad_norm: float) -> None:
    if run.nonfinite_in_row < run.config.run.max_nonfinite_in_row:
        return
    first_bad = run.step - run.nonfinite_in_row + 1
    raise TrainingStopped(
        f"stopped at step {run.step}: {run.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
        f"(last loss {loss}, gradient norm {grad_norm}); they did not change the weights and no checkpoint was "
        f"written during them. {_before_divergence(run, first_bad)}. "
        "Try a lower optim.lr, optim.grad_clip_norm, or precision=bf16"
    )


def run_loop(run: Run) -> TrainResult:
    """Train from ``run.step`` to ``run.total_steps``; see the module docstring."""
    device = run.context.device
    progress = _Progress(run)
    checkpoint: Path | None = None
    batches = iter(epoch_loader(run, run.epoch, run.epoch_batch))
    failing = True
    if run.config.minutes is not None:
        run.budget = TimeBudget(run.config.minutes * 60, run.budget_spent, device)
    every = getattr(run.evaluation, "every_steps", 0) or 0
    if every > run.total_steps and run.context.is_main:  # else the user would expect evaluations in between
        progress.bar.write(f"note: eval.every_steps={every} is beyond the run's {run.total_steps} steps: "
                           "the sets are evaluated after the last step only")
    try:
        while run.step < run.total_steps:
            batch, rows = _next_batch(run, batches)
            if batch is None:  # epoch done: the next one has its own order and augmentation
                run.epoch, run.epoch_batch, run.epoch_stages = run.epoch + 1, 0, []
                batches = iter(epoch_loader(run, run.epoch))
                continue
            progress.skipped_samples += len(batch.skipped)
            if rows == 0:  # every sample of this batch was bad on some process: nothing to learn from
                run.epoch_batch = batch.index + 1
                continue
            images = batch.images[:rows].to(device, non_blocking=True)  # (rows, 3, H, W)
            tokens = batch.tokens[:rows].to(device, non_blocking=True)  # (rows, L)
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm, nonfinite = _optimizer_step(run, images, tokens)
            run.step, run.epoch_batch = run.step + 1, batch.index + 1
            run.nonfinite_in_row = run.nonfinite_in_row + 1 if nonfinite else 0
            if nonfinite:
                progress.nonfinite(run.step, loss, grad_norm)
                _stop_if_too_many_nonfinite(run, loss, grad_norm)
            if run.budget is not None:  # before the end-of-run checks below, which read the total
                run.total_steps = run.budget.replan(run.step, run.total_steps)  # so does the LR schedule
                progress.bar.total = run.total_steps  # shown at the bar's next refresh
            progress.record(run, loss, lr, grad_norm, rows)
            # Evaluate before checkpointing the same step: a run resumed from that checkpoint starts
            # after it and would never evaluate it (the evaluation restores every RNG it draws from).
            if run.evaluation is not None and run.evaluation.due(run.step, run.total_steps):
                progress.evaluated(run.step, run.evaluation(run.model, run.step))
            due = run.step % run.config.run.checkpoint_every == 0 or run.step == run.total_steps
            if due and run.nonfinite_in_row == 0:  # never while steps are being skipped as non-finite
                checkpoint = _save(run, checkpoint)
                progress.restart_clock()
        failing = False
    finally:
        progress.close(failing)
    return TrainResult(
        run_dir=Path(run.config.run.run_dir), steps=run.step,
        final_loss=progress.losses[-1] if progress.losses else math.nan, losses=progress.losses,
        checkpoint=checkpoint, skipped_steps=progress.skipped_steps, skipped_samples=progress.skipped_samples,
        is_main=run.context.is_main,
    )
