"""Tile loops behind :mod:`clipforge.loss`: exact losses without the N x N similarity matrix.

Both autograd functions take this rank's L2-normalised image embeddings ``image`` (n, d), the
normalised text embeddings of the global batch ``text`` (N, d) whose rows
``row_offset : row_offset + n`` pair with ``image``, and the log-space ``logit_scale``. They walk
the (n, N) logits ``S = exp(logit_scale) * image @ text.T`` in (tile, tile) blocks held in a few
reused buffers, so memory is O((n + N) d + tile^2) whatever N is. Forward keeps per-row and
per-column statistics; backward recomputes each block from them (flash-attention style), unless
the whole matrix fits in one block (see ``_LogitBlocks``).

Gradient identities used (L the loss, x_i / y_j the rows, s = exp(logit_scale)):
  dL/dx_i = s * sum_j dL/dS_ij y_j,   dL/dy_j = s * sum_i dL/dS_ij x_i,
  dL/dlogit_scale = sum_ij dL/dS_ij S_ij  (accumulated block by block; the diagonal -S_ii terms
  are folded into the blocks so the large terms cancel per entry, as in the naive gradient).
Backward returns ``world_size`` times this rank's share (see :mod:`clipforge.distributed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_max, all_reduce_sum


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def _buffers(like: torch.Tensor, rows: int, cols: int, count: int = 2) -> list[torch.Tensor]:
    """``count`` flat buffers big enough for one (rows, cols) tile each, reused across tiles."""
    return [like.new_empty(rows * cols) for _ in range(count)]


def _tile(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)  # contiguous (rows, cols) view


def _no_autocast(tensor: torch.Tensor):
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _diagonal_rows(r0: int, r1: int, c0: int, c1: int, offset: int) -> tuple[int, int]:
    """Local rows i in [r0, r1) whose pair column offset + i lies in [c0, c1): ``(lo, hi)``."""
    return max(r0, c0 - offset), min(r1, c1 - offset)


def _merge(run_max, run_sum, tile_max, tile_sum) -> None:
    """Fold a tile's (max, sum of exp(v - max)) into running ones, in place; -inf max = empty."""
    new_max = torch.maximum(run_max, tile_max)
    run_sum.mul_((run_max - new_max).exp_()).add_(tile_sum.mul_((tile_max - new_max).exp_()))
    run_max.copy_(new_max)


class _LogitBlocks:
    """The (tile, tile) blocks of ``S = scale * image @ text.T``, row-major, as ``(r0, r1, c0, c1, S)``.

    Blocks are computed into one reused buffer and recomputed on every pass, except when the
    whole (n, N) matrix is no bigger than one block buffer: then the first pass keeps the blocks
    and later passes (backward) read them back, saving a quarter of the matrix products.
    """

    def __init__(self, image: torch.Tensor, text: torch.Tensor, scale: float, tile: int, kept=None):
        self.image, self.text, self.scale, self.tile = image, text, scale, tile
        n, total = image.shape[0], text.shape[0]
        if kept is None and n * total <= tile * tile:
            kept = []
        self.kept: "list[torch.Tensor] | None" = kept  # filled by the first pass, when small
        self.buffer = None if kept is not None else image.new_empty(min(tile, n) * min(tile, total))

    def __iter__(self):
        index = 0
        for r0, r1 in _spans(self.image.shape[0], self.tile):
            scaled_rows = None
            for c0, c1 in _spans(self.text.shape[0], self.tile):
                if self.kept is not None and index < len(self.kept):
                    logits = self.kept[index]
                else:
                    if scaled_rows is None:
                        scaled_rows = self.image[r0:r1] * self.scale  # (R, d)
                    out = None if self.kept is not None else _tile(self.buffer, r1 - r0, c1 - c0)
                    logits = torch.mm(scaled_rows, self.text[c0:c1].T, out=out)  # (R, C)
                    if self.kept is not None:
                        self.kept.append(logits)
                index += 1
                yield r0, r1, c0, c1, logits


class TiledClipLoss(torch.autograd.Function):
    """Symmetric InfoNCE: mean over pairs of (row LSE - S_ii + column LSE - S_ii) / 2.

    Log-sum-exps are kept as (max, log of the sum relative to it): exp(S - max - logsum) is then
    as accurate as a softmax over the full matrix, where a single rounded LSE near |S| = 100
    would cost 4e-6 relative in every probability.
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, row_offset: int, tile: int, world_size: int, group):
        n, total = image.shape[0], text.shape[0]
        scale = float(logit_scale.detach().exp())
        with torch.no_grad(), _no_autocast(image):
            blocks = _LogitBlocks(image, text, scale, tile)
            (buf_exp,) = _buffers(image, min(tile, n), min(tile, total), count=1)
            row_max, row_sum = image.new_full((n,), float("-inf")), image.new_zeros(n)  # over all N columns
            col_max, col_sum = image.new_full((total,), float("-inf")), image.new_zeros(total)  # local rows only
            pair_logits = image.new_empty(n)  # S_ii, the very values the tiles hold
            for r0, r1, c0, c1, logits in blocks:
                shifted = _tile(buf_exp, r1 - r0, c1 - c0)
                tile_max = logits.amax(dim=1, keepdim=True)  # (R, 1)
                tile_sum = torch.sub(logits, tile_max, out=shifted).exp_().sum(dim=1)  # (R,)
                _merge(row_max[r0:r1], row_sum[r0:r1], tile_max.squeeze(1), tile_sum)
                tile_max = logits.amax(dim=0, keepdim=True)  # (1, C)
                tile_sum = torch.sub(logits, tile_max, out=shifted).exp_().sum(dim=0)  # (C,)
                _merge(col_max[c0:c1], col_sum[c0:c1], tile_max.squeeze(0), tile_sum)
                lo, hi = _diagonal_rows(r0, r1, c0, c1, row_offset)
                if lo < hi:
                    pair_logits[lo:hi] = logits.diagonal(row_offset + r0 - c0)
            # sum_i (row LSE_i - S_ii) - sum_i S_ii over local rows, in fp64 (large terms cancel).
            row_logsum = row_sum.log_()
            local = ((row_max - pair_logits) + row_logsum).double().sum() - pair_logits.double().sum()
            if world_size > 1:  # column statistics of all rows: common max, then sums relative to it
                global_max = all_reduce_max(col_max.clone(), group)
                packed = torch.cat([(col_sum * (col_max - global_max).exp_()).double(), local.view(1)])  # (N + 1,)
                all_reduce_sum(packed, group)
                col_max, col_sum, local = global_max, packed[:total].to(col_sum.dtype), packed[total]
            col_logsum = col_sum.log_()
            loss = (local + (col_max.double() + col_logsum.double()).sum()) / (2 * total)
        ctx.save_for_backward(image, text, logit_scale, row_max, row_logsum, col_max, col_logsum)
        ctx.scale, ctx.row_offset, ctx.tile, ctx.world_size = scale, row_offset, tile, world_size
        ctx.kept_logits = blocks.kept
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, logit_scale, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        scale, offset, tile = ctx.scale, ctx.row_offset, ctx.tile
        n, total = image.shape[0], text.shape[0]
        need_text = ctx.needs_input_grad[1]
        # dL/dS_ij = coef * (P_ij + Q_ij - 2 [i == j]), P / Q the row / column softmax.
        coef = float(grad_loss) * ctx.world_size / (2 * total)
        with torch.no_grad(), _no_autocast(image):
            grad_image, grad_text = torch.zeros_like(image), torch.zeros_like(text) if need_text else None
            grad_scale = image.new_zeros((), dtype=torch.float64)
            blocks = _LogitBlocks(image, text, scale, tile, kept=ctx.kept_logits)
            ctx.kept_logits = None  # the graph (and ctx) may outlive backward: do not pin the block
            buf_rows, buf_cols = _buffers(image, min(tile, n), min(tile, total))
            for r0, r1, c0, c1, logits in blocks:
                shape = (r1 - r0, c1 - c0)
                grad_logits = torch.sub(logits, row_max[r0:r1, None], out=_tile(buf_rows, *shape))
                grad_logits.sub_(row_logsum[r0:r1, None]).exp_()  # P, (R, C)
                softmax_cols = torch.sub(logits, col_max[None, c0:c1], out=_tile(buf_cols, *shape))
                softmax_cols.sub_(col_logsum[None, c0:c1]).exp_()  # Q, (R, C)
                grad_logits.add_(softmax_cols).diagonal(offset + r0 - c0).sub_(2.0)  # -S_ii, if here
                grad_scale += torch.dot(grad_logits.view(-1), logits.view(-1))
                grad_image[r0:r1].addmm_(grad_logits, text[c0:c1], alpha=coef * scale)
                if need_text:
                    grad_text[c0:c1].addmm_(grad_logits.T, image[r0:r1], alpha=coef * scale)
            grad_scale = (grad_scale * coef).reshape(logit_scale.shape).to(logit_scale.dtype)
        return grad_image, grad_text, grad_scale, None, None, None, None


class TiledSigmoidLoss(torch.autograd.Function):
    """SigLIP: sum over all pairs of softplus(-z_ij * (S_ij + b)) / N, z = +1 on the diagonal."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, row_offset: int, tile: int, world_size: int, group):
        n, total = image.shape[0], text.shape[0]
        scale, bias = float(logit_scale.detach().exp()), float(logit_bias.detach())
        with torch.no_grad(), _no_autocast(image):
            blocks = _LogitBlocks(image, text, scale, tile)
            (buf_signed,) = _buffers(image, min(tile, n), min(tile, total), count=1)
            local = image.new_zeros((), dtype=torch.float64)
            for r0, r1, c0, c1, logits in blocks:
                signed = torch.add(logits, bias, out=_tile(buf_signed, r1 - r0, c1 - c0))  # (R, C)
                signed.diagonal(row_offset + r0 - c0).neg_()  # -z_ij * l_ij: flip the matching pairs
                local += F.softplus(signed).sum()
            if world_size > 1:
                local = all_reduce_sum(local.view(1), group)[0]
            loss = local / total
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.scale, ctx.bias, ctx.row_offset, ctx.tile, ctx.world_size = scale, bias, row_offset, tile, world_size
        ctx.kept_logits = blocks.kept
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        scale, bias, offset, tile = ctx.scale, ctx.bias, ctx.row_offset, ctx.tile
        n, total = image.shape[0], text.shape[0]
        need_text = ctx.needs_input_grad[1]
        coef = float(grad_loss) * ctx.world_size / total  # dL/dl_ij = coef * (sigmoid(l_ij) - [i == j])
        with torch.no_grad(), _no_autocast(image):
            grad_image, grad_text = torch.zeros_like(image), torch.zeros_like(text) if need_text else None
            grad_scale = image.new_zeros((), dtype=torch.float64)
            grad_bias = image.new_zeros((), dtype=torch.float64)
            blocks = _LogitBlocks(image, text, scale, tile, kept=ctx.kept_logits)
            ctx.kept_logits = None  # the graph (and ctx) may outlive backward: do not pin the block
            (buf_grad,) = _buffers(image, min(tile, n), min(tile, total), count=1)
            for r0, r1, c0, c1, logits in blocks:
                grad_logits = torch.add(logits, bias, out=_tile(buf_grad, r1 - r0, c1 - c0))  # (R, C)
                pairs = grad_logits.diagonal(offset + r0 - c0)  # matching pairs in this tile, if any
                pairs.neg_()
                grad_logits.sigmoid_()
                pairs.neg_()  # sigmoid(l) - 1 = -sigmoid(-l), without the cancellation
                grad_bias += grad_logits.sum()
                grad_scale += torch.dot(grad_logits.view(-1), logits.view(-1))
                grad_image[r0:r1].addmm_(grad_logits, text[c0:c1], alpha=coef * scale)
                if need_text:
                    grad_text[c0:c1].addmm_(grad_logits.T, image[r0:r1], alpha=coef * scale)
            grad_scale = (grad_scale * coef).reshape(logit_scale.shape).to(logit_scale.dtype)
            grad_bias = (grad_bias * coef).reshape(logit_bias.shape).to(logit_bias.dtype)
        return grad_image, grad_text, grad_scale, grad_bias, None, None, None, None
