"""Which samples make batch b of an epoch on one rank: an exact split with no duplicates or losses.

An epoch of N samples is a sequence of *epoch positions* 0..N-1 that the source maps to samples
(a permutation of rows for a caption file; shards in a permuted order for tar shards).

Random-access sources (caption files) use *global batches* (``global_batches=True``): positions
are cut into global batches of ``batch_size * world_size``, and rank r takes the r-th slice of
``batch_size`` of each. Global batch b is then the same on 1, 2 or any number of processes, so the
gathered loss, the gradient and a resume on another world size do not depend on it. With
``drop_last=False`` the last, partial global batch is split as evenly as possible over ranks.

Sequential sources (tar shards) split the epoch by rank first, so each worker reads its own run of
shards front to back:

1. Ranks: rank r takes the contiguous positions [N*r//W, N*(r+1)//W). Counts differ by at most
   one, whatever N; nothing is padded or repeated.
2. Lanes: a rank's range is cut into L contiguous lanes. Caption files use one lane (any worker can
   read any row). Shards use one lane per data-loader worker, so each worker reads its own run of
   shards front to back instead of every worker reading every shard.
3. Blocks (shards only): within a lane, positions are shuffled inside blocks of ``block`` samples
   (a multiple of the batch size) with a generator seeded by (seed, epoch, block start). Shards
   are then not read in file order within an epoch, and a batch is one block's shuffle away
   from the same neighbours each epoch, while a worker holds one block of raw bytes at a time.
4. Batches: lane w's samples are cut into batches of ``batch_size``; batch indices go round-robin
   over lanes (batch 0 from lane 0, batch 1 from lane 1, ...), and data-loader worker k serves
   batches start+k, start+k+K, ... - so with L = K each worker stays on its own lane.

``drop_last=True`` (training) keeps only full batches and gives every rank the same number of them
(the minimum over ranks), so collective ops stay in step; at most L*batch_size samples per rank
are left out of an epoch, different ones each epoch. ``drop_last=False`` keeps every sample exactly
once, ending each lane with a partial batch; ranks may then have different batch counts.

Continuing an epoch on another world size (shards): :func:`remaining_positions` lists the epoch
positions that the batches already taken did not cover, and ``EpochPlan(positions=...)`` plans the
rest of the epoch over them alone. No sample of the epoch is then repeated or skipped, but the
order of the remaining batches differs from any uninterrupted run.

The plan is a pure function of (N, batch_size, rank, world_size, lanes, block, drop_last, seed,
epoch, global_batches): batch b is the same whether the epoch started at batch 0 or resumed at b.
"""
from __future__ import annotations

import numpy as np


def _lane_ranges(num_samples: int, rank: int, world_size: int, lanes: int) -> list[tuple[int, int]]:
    """[start, stop) epoch positions of each lane of ``rank``."""
    low, high = num_samples * rank // world_size, num_samples * (rank + 1) // world_size
    size = high - low
    return [(low + size * w // lanes, low + size * (w + 1) // lanes) for w in range(lanes)]


def _lane_batch_counts(ranges: list[tuple[int, int]], batch_size: int, drop_last: bool) -> list[int]:
    """Batches each lane yields: full ones only, or with a trailing partial one."""
    sizes = [stop - start for start, stop in ranges]
    return [s // batch_size if drop_last else -(-s // batch_size) for s in sizes]


class EpochPlan:
    """The batches of one epoch on one rank, as lists of epoch positions. See the module docstring."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, lanes: int = 1,
                 block: int = 0, drop_last: bool = True, seed: int = 0, epoch: int = 0,
                 global_batches: bool = False, positions: np.ndarray | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batches and (lanes != 1 or block):
            raise ValueError("global_batches needs lanes=1 and block=0 (random-access sources)")
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.global_batches = global_batches
        # Plan over len(positions) virtual positions, mapped back through ``positions`` (sorted).
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        if self.positions is not None:
            num_samples = len(self.positions)
        if global_batches:
            self._plan_global(num_samples, rank, world_size, drop_last)
            return
        self.block = batch_size * max(1, round(block / batch_size)) if block else 0
        self.lanes = _lane_ranges(num_samples, rank, world_size, lanes)
        counts = _lane_batch_counts(self.lanes, batch_size, drop_last)
        self._full_rounds = min(counts)  # rounds in which every lane has a batch
        self._tail = [(j, w) for j in range(min(counts), max(counts)) for w in range(lanes) if j < counts[w]]
        self.num_batches = sum(counts)
        if drop_last:  # the same count on every rank, so no rank waits in a collective for another
            self.num_batches = min(
                sum(_lane_batch_counts(_lane_ranges(num_samples, r, world_size, lanes), batch_size, True))
                for r in range(world_size)
            )

    def _plan_global(self, num_samples: int, rank: int, world_size: int, drop_last: bool) -> None:
        """Rank ``rank``'s slice of every global batch of ``batch_size * world_size`` positions."""
        global_size = self.batch_size * world_size
        full = num_samples // global_size
        self._slices = [(b * global_size + rank * self.batch_size, b * global_size + (rank + 1) * self.batch_size)
                        for b in range(full)]
        tail = num_samples - full * global_size
        if not drop_last and tail:  # the partial last global batch, split evenly; a rank's share may be empty
            low, high = full * global_size + tail * rank // world_size, full * global_size + tail * (rank + 1) // world_size
            if high > low:
                self._slices.append((low, high))
        self.num_batches = len(self._slices)

    def _lane_and_round(self, index: int) -> tuple[int, int]:
        """(lane, batch number within the lane) of batch ``index``."""
        lanes = len(self.lanes)
        if index < self._full_rounds * lanes:
            return index % lanes, index // lanes
        round_, lane = self._tail[index - self._full_rounds * lanes]
        return lane, round_

    def batch(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Epoch positions of batch ``index`` in row order, and the contiguous [start, stop) range to
        read to get them (the whole shuffle block for shards, the batch itself otherwise)."""
        positions, (start, stop) = self._virtual_batch(index)
        if self.positions is None:
            return positions, (start, stop)
        return self.positions[positions], (int(self.positions[start]), int(self.positions[stop - 1]) + 1)

    def _virtual_batch(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range: this epoch has {self.num_batches} batches")
        if self.global_batches:
            start, stop = self._slices[index]
            return np.arange(start, stop), (start, stop)
        lane, round_ = self._lane_and_round(index)
        lane_start, lane_stop = self.lanes[lane]
        first = round_ * self.batch_size  # offsets from lane_start
        last = min(first + self.batch_size, lane_stop - lane_start)
        if not self.block:
            return np.arange(lane_start + first, lane_start + last), (lane_start + first, lane_start + last)
        block_first = first // self.block * self.block
        block_last = min(block_first + self.block, lane_stop - lane_start)
        block_start = lane_start + block_first
        shuffle = np.random.default_rng([self.seed, self.epoch, block_start]).permutation(block_last - block_first)
        positions = block_start + shuffle[first - block_first:last - block_first]
        return positions, (block_start, lane_start + block_last)


def remaining_positions(num_samples: int, batch_size: int, stages: list, *, block: int = 0, seed: int = 0,
                        epoch: int = 0) -> np.ndarray:
    """Sorted epoch positions of a sequential (shard) epoch not yet covered after ``stages``.

    ``stages`` lists how the epoch has run so far, oldest first: ``(world_size, lanes, batches_done)``
    for each stretch run on one world size (the first over all positions, each later one over what
    the previous left). ``batch_size`` is the global batch (per rank: ``batch_size // world_size``).
    Plans are the training ones (``drop_last=True``).
    """
    left = np.arange(num_samples, dtype=np.int64)
    for world_size, lanes, batches_done in stages:
        used = [plan.batch(i)[0] for rank in range(world_size)
                for plan in [EpochPlan(len(left), batch_size // world_size, rank=rank, world_size=world_size,
                                       lanes=lanes, block=block, seed=seed, epoch=epoch, positions=left)]
                for i in range(min(batches_done, plan.num_batches))]
        if used:
            left = np.setdiff1d(left, np.concatenate(used), assume_unique=True)
    return left
