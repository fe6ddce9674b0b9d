"""Collectives the losses and the training step need, with gradients routed to the owning rank.

Setting up the process group is :mod:`clipforge.train.distributed_setup`'s job; everything here
reads the group that is already there and falls back to one process when there is none.

Gradient convention of the gathered losses (see :mod:`clipforge.loss`): every rank's loss *value*
is the loss of the global batch, and backward on every rank leaves the gradients of its own
parameters equal to ``world_size`` times its share of the global gradient. Averaging the
gradients over ranks (DDP's all-reduce, or :func:`average_gradients`) therefore gives exactly
the gradient a single process computes on the concatenated batch.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def world_info(group: "dist.ProcessGroup | None" = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``; ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _uses_nccl(group: "dist.ProcessGroup | None") -> bool:
    return dist.get_backend(group) in ("nccl", "xccl")


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``(n, ...)`` tensor; backward sums the gradients into the owner."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, world_size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        tensor = tensor.contiguous()
        if _uses_nccl(group):
            gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
            dist.all_gather_into_tensor(gathered, tensor, group=group)
            return gathered  # (world_size * n, ...)
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=0)  # (world_size * n, ...)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        grad_gathered = grad_gathered.contiguous()
        if _uses_nccl(ctx.group):
            grad = grad_gathered.new_empty((ctx.rows, *grad_gathered.shape[1:]))
            dist.reduce_scatter_tensor(grad, grad_gathered, group=ctx.group)
        else:
            # gloo has no reduce-scatter: sum everything, keep this rank's rows.
            dist.all_reduce(grad_gathered, group=ctx.group)
            grad = grad_gathered[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].clone()
        return grad, None, None, None


def all_gather_with_grad(tensor: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; gradients flow back.

    The backward sums, over all ranks, the gradient each rank computed for the rows of rank ``r``
    and hands that sum to rank ``r`` (reduce-scatter). All ranks must pass the same shape; a
    mismatch raises ``ValueError`` naming every rank's size. Without a process group it returns
    ``tensor`` itself.
    """
    rank, world_size = world_info(group)
    if world_size == 1:
        return tensor
    shape = torch.tensor(list(tensor.shape), dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        sizes = [tuple(s.tolist()) for s in shapes]
        raise ValueError(f"all ranks must pass tensors of the same shape to gather, got {sizes} by rank")
    return _AllGatherWithGrad.apply(tensor, group, world_size, rank)


def all_reduce_sum(tensor: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """In-place sum of ``tensor`` over ranks (no gradient); a no-op without a process group."""
    if world_info(group)[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """In-place element-wise maximum of ``tensor`` over ranks; a no-op without a process group."""
    if world_info(group)[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def average_gradients(
    parameters: Iterable[torch.nn.Parameter],
    group: "dist.ProcessGroup | None" = None,
    bucket_bytes: int = 64 << 20,
) -> None:
    """Replace each ``.grad`` by its mean over ranks, as DistributedDataParallel does.

    Call it after :func:`clipforge.train.grad_cache.contrastive_step` (or any backward through the
    gathered losses) and before the optimizer step. Gradients are flattened into buckets of about
    ``bucket_bytes`` so a model costs a few collectives, not one per tensor. Every rank must own
    gradients for the same parameters (a ``None`` gradient counts as zeros). No-op on one process.
    """
    _, world_size = world_info(group)
    if world_size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _average_bucket(bucket, world_size, group)
            bucket, size = [], 0
    if bucket:
        _average_bucket(bucket, world_size, group)


def _average_bucket(grads: list[torch.Tensor], world_size: int, group) -> None:
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # (total elements,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class OverlappedGradientAverager:
    """Average gradients over ranks in buckets launched *during* backward, as DDP does.

    A hook on each parameter (``register_post_accumulate_grad_hook``) marks its gradient ready;
    when every gradient of a bucket (about ``bucket_bytes``, parameters in reverse registration
    order, which is roughly the order backward produces them) is ready, the bucket is flattened
    and its all-reduce starts asynchronously while backward goes on with earlier layers.
    :meth:`finish` waits for every bucket, launches those a gradient never reached (zeros, as
    :func:`average_gradients` counts a ``None`` gradient) and writes the means back into ``.grad``.

    Use it for steps with one backward per parameter (set :attr:`active` False around steps that
    accumulate several backwards, such as gradient caching's chunks, and average those with
    :func:`average_gradients`). Every rank must build it over the same parameters. The result is
    the same sum-then-divide as :func:`average_gradients`, element by element.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], group: "dist.ProcessGroup | None" = None,
                 bucket_bytes: int = 25 << 20):
        self.group = group
        self.world_size = world_info(group)[1]
        self.active = True
        params = [p for p in parameters if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(params):
            key = (p.dtype, p.device)
            if not self.buckets or size >= bucket_bytes or (self.buckets[-1][0].dtype, self.buckets[-1][0].device) != key:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]  # gradients not yet ready per bucket
        self._launched: dict[int, tuple[torch.Tensor, object]] = {}  # bucket -> (flat sum, work)

    def _ready(self, param: torch.nn.Parameter) -> None:
        if not self.active or self.world_size == 1:
            return
        bucket = self._bucket_of[id(param)]
        self._waiting[bucket] -= 1
        if self._waiting[bucket] == 0:
            self._launch(bucket)

    def _launch(self, bucket: int) -> None:
        for p in self.buckets[bucket]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[bucket]])  # (bucket elements,)
        self._launched[bucket] = (flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True))

    def finish(self) -> None:
        """Wait for every bucket and leave each ``.grad`` equal to its mean over ranks."""
        if self.world_size == 1:
            return
        for bucket in range(len(self.buckets)):  # the same order on every rank
            if bucket not in self._launched:
                self._launch(bucket)
        for bucket, (flat, work) in sorted(self._launched.items()):
            work.wait()
            flat.div_(self.world_size)
            offset = 0
            for p in self.buckets[bucket]:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self._reset()

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self._handles:
            handle.remove()
