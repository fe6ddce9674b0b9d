"""The training data loader: exact per-epoch splitting, deterministic batches, resumable mid-epoch.

Typical use in a training loop::

    dataset = open_dataset("/data/cc3m-{0000..0331}.tar")            # fails fast on config errors
    for epoch in range(start_epoch, epochs):
        loader = make_train_loader(dataset, preprocess, tokenize, batch_size=256, epoch=epoch, seed=0,
                                   rank=rank, world_size=world_size, num_workers=8,
                                   start_batch=resume_batch if epoch == start_epoch else 0)
        for batch in loader:          # batch.images (n, 3, H, W), batch.tokens (n, L)
            ...                       # after the step, store epoch and batch.index + 1 to resume

Batch b of an epoch is a pure function of (dataset, seed, epoch, rank, world_size, batch_size,
lanes): which samples (see ``order.py``), which caption of a multi-caption sample, and the random
augmentation (the RNGs are seeded from (seed, epoch, epoch position) before each sample, so a
sample's crop does not depend on the rank, worker or batch it lands in). So a run resumed with
``start_batch=b`` yields exactly the batches b, b+1, ... of an uninterrupted run. For caption
files batches are global (``order.py``): global batch b is the same on any number of processes
and workers, so a run may resume on another world size. For tar shards the lanes are the workers
and the split is by rank, so exact resume needs the same ``num_workers`` and world size (see
``remaining`` in ``order.py`` for continuing an epoch on another world size).

A sample that cannot be used (unreadable, truncated or non-image file, missing caption) is dropped
from its batch, logged with its key and counted; the batch then has fewer than ``batch_size``
rows (possibly zero), and ranks may differ in rows, so a gathered loss must first agree on a row
count (the training loop trims every rank to the smallest). Dropping keeps batches a function of the plan alone - refilling would make
batch b depend on how many bad samples came before it. When the skip rate passes
``max_skip_fraction``, iteration raises TooManyBadSamples.

Any dataset works that has ``__len__`` (samples per epoch), ``sequential`` (True when it must be
read in order, like tar shards) and ``epoch_view(epoch, seed)`` returning an object whose ``len()``
is the epoch's sample count and whose ``read(start, stop)`` gives the RawSamples at epoch positions start..stop-1.
"""
from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .captions import CAPTION_FILE_SUFFIXES, CaptionDataset
from .order import EpochPlan
from .samples import BadSample, to_pair
from .skips import SkipCounter
from .webdataset import ShardDataset

Dataset = CaptionDataset | ShardDataset


def open_dataset(data: str | os.PathLike | list, *, image_root: str | os.PathLike | None = None,
                 image_key: str | None = None, caption_key: str | None = None,
                 weights: list[float] | None = None, resampled: bool = False) -> Dataset:
    """Open training data by what ``data`` names; raises on configuration errors before any work.

    A ``.csv``/``.tsv``/``.jsonl`` file is a caption file (images under ``image_root``, default its
    folder); a tar path or brace pattern (``data-{0000..0099}.tar``, also ``http(s)://`` and
    ``pipe:`` URLs), a list of them (several sources, mixed by ``weights`` when ``resampled``) or a
    folder of ``*.tar`` files are WebDataset shards; ``resampled`` draws shards with replacement.
    """
    shard_options = dict(caption_key=caption_key, weights=weights, resampled=resampled)
    if isinstance(data, (list, tuple)):
        return ShardDataset(data, **shard_options)
    text = str(data)
    if text.lower().endswith(CAPTION_FILE_SUFFIXES):
        if resampled or weights:
            raise ValueError(f"data.resampled and data.weights apply to tar shards, not to the caption file {text}")
        return CaptionDataset(data, image_root, image_key=image_key, caption_key=caption_key)
    if ".tar" in text or os.path.isdir(text) or text.startswith("pipe:"):
        return ShardDataset(data, **shard_options)
    if not os.path.exists(text):
        raise FileNotFoundError(f"training data not found: {text}")
    raise ValueError(f"cannot tell the format of {text}: expected a .csv/.tsv/.jsonl caption file, "
                     f"tar shards (a .tar path or brace pattern) or a folder of .tar shards")


@dataclass
class Batch:
    """One training batch; ``len(batch)`` rows, fewer than batch_size when samples were skipped."""

    images: torch.Tensor   # (n, 3, H, W) from preprocess; shape (0,) when every row was skipped
    tokens: torch.Tensor   # (n, context_length) int64 from tokenize; shape (0,) when empty
    keys: list[str]        # the n samples' keys (file path or shard:key)
    index: int             # batch index within the epoch; resume after it with start_batch=index + 1
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of dropped rows

    def __len__(self) -> int:
        return len(self.keys)


@contextmanager
def _private_rngs():
    """Let the block reseed torch, numpy and random freely; their states are restored after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _seed_rngs(*entropy: int) -> None:
    """Seed torch's CPU generator, numpy and random from ``entropy`` (call inside :func:`_private_rngs`).

    The CPU generator alone, which the augmentations draw from: ``torch.manual_seed`` also queues a
    seed for every lazily initialised accelerator (CUDA, XPU, MTIA), formatting a stack trace for
    each, 1.1 ms a sample, as long as decoding a demo image three times over.
    """
    seed_words = np.random.SeedSequence(list(entropy)).generate_state(2)
    torch.default_generator.manual_seed(int(seed_words[0]))
    random.seed(int(seed_words[0]))
    np.random.seed(int(seed_words[1]))


class _BatchStream(IterableDataset):
    """Yields batch dicts start_batch.. of a plan; worker k of K takes every K-th from start+k."""

    def __init__(self, view, plan: EpochPlan, start_batch: int, preprocess: Callable, tokenize: Callable,
                 seed: int, epoch: int, draft_size: int | None = None):
        self.view, self.plan, self.start_batch = view, plan, start_batch
        self.preprocess, self.tokenize = preprocess, tokenize
        self.seed, self.epoch, self.draft_size = seed, epoch, draft_size

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        block_range, block = None, []  # raw samples of the last range read, reused by the next batch
        for index in range(self.start_batch + worker_id, self.plan.num_batches, num_workers):
            positions, read_range = self.plan.batch(index)
            if read_range != block_range:
                block_range, block = read_range, self.view.read(*read_range)
            raws = [block[p - read_range[0]] for p in positions]
            yield self._make_batch(index, positions, raws)

    def _make_batch(self, index: int, positions: np.ndarray, raws: list) -> dict:
        """Decode, augment and tokenize one batch; bad samples go to ``skipped`` instead."""
        images, captions, keys, skipped = [], [], [], []
        with _private_rngs():
            for position, raw in zip(positions, raws):
                # Augmentation draws depend on the sample alone, not on the rank, worker or batch:
                # the same sample gets the same crop on any number of processes.
                _seed_rngs(self.seed, self.epoch, int(position))
                try:
                    image, caption = to_pair(raw, self.seed, self.epoch, int(position), self.draft_size)
                except BadSample as err:
                    skipped.append((raw.key, str(err)))
                    continue
                images.append(self.preprocess(image))
                captions.append(caption)
                keys.append(raw.key)
        if not keys:
            return {"images": torch.empty(0), "tokens": torch.empty(0, dtype=torch.long), "keys": keys,
                    "index": index, "skipped": skipped}
        return {"images": torch.stack(images), "tokens": self.tokenize(captions), "keys": keys,  # (n, 3, H, W)
                "index": index, "skipped": skipped}


def _let_ending_queue_threads_finish(timeout_s: float = 2.0) -> None:
    """Join the queue feeder threads of the last epoch's loader before forking the next one's workers.

    A precaution, not a proven fix. A forked worker inherits every lock another thread holds at the
    fork; CPython 3.11.7 hangs such a child for good in ``PyOS_AfterFork_Child`` when that lock is
    the thread-state list lock (gh-112275). Python threads such as these feeders take that lock only
    while holding the GIL, which the forking thread holds, so they cannot cause it; native threads
    entering Python (``PyGILState_Ensure``) can. Without this join about one fork in six ran beside a
    still-ending feeder thread, with no hang in 1,900 epoch boundaries (one and two gloo processes,
    workers 1-2); the join takes under 2 ms. A 2-process CI run once hung at an epoch boundary with a
    worker in ``PyOS_AfterFork_Child``: that hang was never reproduced and its cause is unknown."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


class TrainLoader:
    """Iterable over one epoch's batches on one rank (from ``start_batch``); see make_train_loader."""

    def __init__(self, stream: _BatchStream, num_workers: int, pin_memory: bool, skips: SkipCounter):
        self.stream, self.num_workers, self.pin_memory, self.skips = stream, num_workers, pin_memory, skips
        self.num_batches = stream.plan.num_batches  # batches in the whole epoch, the same on every rank
        self.start_batch = stream.start_batch

    def __len__(self) -> int:
        """Batches this loader yields: num_batches - start_batch."""
        return self.num_batches - self.start_batch

    def __iter__(self):
        # A private generator: creating the iterator must not draw from the global torch RNG,
        # or a resumed run's model RNG would drift from the uninterrupted one.
        generator = torch.Generator().manual_seed(self.stream.seed)
        if self.num_workers:
            _let_ending_queue_threads_finish()
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=generator)
        for out in loader:
            self.skips.add(len(out["keys"]) + len(out["skipped"]), out["skipped"])
            self.skips.check()
            yield Batch(images=out["images"], tokens=out["tokens"], keys=out["keys"], index=int(out["index"]),
                        skipped=[tuple(s) for s in out["skipped"]])
        self.skips.check(final=True)


def plan_lanes(dataset: Dataset, num_workers: int) -> int:
    """Lanes of the epoch plan: one per worker for shards (each reads its own run), else one."""
    return max(1, num_workers) if dataset.sequential else 1


def make_train_loader(dataset: Dataset, preprocess: Callable, tokenize: Callable, batch_size: int, *,
                      epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                      start_batch: int = 0, drop_last: bool = True, max_skip_fraction: float = 0.01,
                      min_seen: int = 1000, shuffle_block: int = 1024, pin_memory: bool = False,
                      positions: np.ndarray | None = None, draft_size: int | None = None) -> TrainLoader:
    """A loader for one epoch of ``dataset`` on one rank, starting at batch ``start_batch``.

    ``preprocess`` maps an RGB PIL image to a (3, H, W) tensor (``image_transform(size, train=True)``);
    ``tokenize`` maps a list of n captions to an (n, L) int64 tensor (``partial(tokenize,
    truncate=True)`` so long captions are cut, not fatal). ``batch_size`` is per rank.
    ``drop_last=True`` yields only full-plan batches, the same number on every rank; ``False`` yields
    every sample exactly once (ranks may differ by a batch). ``shuffle_block`` (shards only) is the
    number of samples shuffled together inside a worker's run of shards, rounded to a multiple of
    batch_size; their raw bytes are held in memory. Skip-rate checks start after ``min_seen``
    samples and run again at the end of the epoch. ``positions`` (shards) restricts the epoch to
    those sorted epoch positions: the rest of an epoch continued on another world size (see
    ``order.remaining_positions``); it may hold no full batch, and the loader then yields nothing.
    ``draft_size``: JPEGs at least twice that size are decoded at a reduced scale that keeps both
    sides >= draft_size (PIL draft mode, see ``samples.decode_image``); None decodes in full.

    Raises ValueError when the rank's share cannot fill one batch or ``start_batch`` is past the end.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    lanes = plan_lanes(dataset, num_workers)
    view = dataset.epoch_view(epoch, seed)
    plan = EpochPlan(len(view), batch_size, rank=rank, world_size=world_size, lanes=lanes,
                     block=shuffle_block if dataset.sequential else 0, drop_last=drop_last, seed=seed, epoch=epoch,
                     global_batches=not dataset.sequential, positions=positions)
    if plan.num_batches == 0 and positions is None:
        raise ValueError(f"{dataset!r} has too few samples for one batch of {batch_size} per rank "
                         f"on {world_size} rank(s) x {lanes} lane(s); lower the batch size (--batch-size) or data.workers (--set data.workers=N)")
    if not 0 <= start_batch <= plan.num_batches:
        raise ValueError(f"start_batch must be in [0, {plan.num_batches}] for this epoch, got {start_batch}")
    stream = _BatchStream(view, plan, start_batch, preprocess, tokenize, seed, epoch,
                          draft_size)
    return TrainLoader(stream, num_workers, pin_memory, SkipCounter(max_skip_fraction, min_seen))
