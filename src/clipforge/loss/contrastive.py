"""Contrastive losses of CLIP and SigLIP: exact, in memory linear in the batch, across ranks.

``contrastive_loss`` is the paper's symmetric cross-entropy over the image->text and text->image
logits ``exp(logit_scale) * normalize(image) @ normalize(text).T``; ``sigmoid_loss`` is SigLIP's
pairwise sigmoid loss. Both walk the N x N logits tile by tile (:mod:`clipforge.loss._tiled`)
and never hold more than one (tile, tile) block, so a 32,768-pair batch needs tens of MiB, not
the 4 GiB per copy of the naive matrix; values and gradients match the naive formulation.
``naive_contrastive_loss`` / ``naive_sigmoid_loss`` keep that formulation for tests and small N.

Conventions, shared with open_clip:
- Embeddings are the encoders' raw outputs; the losses L2-normalise them (``normalize=True``).
  Passing already-normalised embeddings is harmless (normalising twice changes nothing).
- ``logit_scale`` is the model's log-space parameter; the loss multiplies by ``exp(logit_scale)``
  without clamping (a clamp in the graph would zero its gradient). The training loop keeps the
  scale at most 100 by clamping the parameter after each optimizer step:
  :func:`clamp_logit_scale_`.
- Computation is fp32 (fp64 for fp64 inputs) even under ``torch.autocast``.

Across processes (``gather=True`` with an initialised process group), each rank passes its own
``n`` pairs; text embeddings are gathered with gradients and every rank computes its ``n`` rows
against all ``N = world_size * n`` texts. The returned value on every rank is the loss of the
global batch of N pairs, identical to one process on the concatenated batch. Backward leaves on
each rank ``world_size`` times that rank's share of the gradient, so the mean over ranks (what
DDP's all-reduce or :func:`clipforge.distributed.average_gradients` computes) is exactly the
single-process gradient. All ranks must pass the same ``n``.

:class:`Objective` is the training objective as a module: either loss with the model's own
``logit_scale``; SigLIP's learnable bias lives there, so optimizer and checkpoints pick it up.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_gather_with_grad, world_info
from ._tiled import TiledClipLoss, TiledSigmoidLoss

LOGIT_SCALE_MAX = math.log(100.0)  # the paper caps exp(logit_scale) at 100
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP's initial temperature t' (scale 10)
SIGLIP_INIT_LOGIT_BIAS = -10.0  # SigLIP's initial bias b
DEFAULT_TILE_SIZE = 4096  # rows and columns per block: 64 MiB per fp32 block buffer, few enough
# blocks that per-operation overheads (thread start-up, synchronisation) stay small


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor, tile_size: int) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape or image_features.shape[0] == 0:
        raise ValueError(
            "image_features and text_features must both have shape (N, embed_dim) with N >= 1, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")


def _as_scalar(value, name: str, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a single number, got shape {tuple(value.shape)}")
    return value


def _prepare(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fp32 (fp64 stays fp64), optionally L2-normalised rows; (N, d) -> (N, d)."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    features = features.to(dtype)
    return F.normalize(features, dim=-1) if normalize else features


def _local_and_gathered(image_features, text_features, normalize, gather, group):
    """This rank's images, all ranks' texts (gathered with grad), the offset of our pairs, world."""
    rank, world_size = world_info(group) if gather else (0, 1)
    image = _prepare(image_features, normalize)
    text = _prepare(text_features, normalize)
    if world_size > 1:
        text = all_gather_with_grad(text.contiguous(), group)  # (world_size * n, d)
    return image.contiguous(), text.contiguous(), rank * image.shape[0], world_size


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: "torch.Tensor | float",
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    gather: bool = True,
    normalize: bool = True,
    group=None,
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss of ``N`` pairs, exact, without an N x N matrix.

    ``image_features`` and ``text_features`` are ``(N, embed_dim)`` with row ``i`` of each a
    matching pair; ``logit_scale`` is the log-space temperature parameter (a 0-dim tensor, its
    gradient is computed). Returns the mean of the image->text and text->image cross-entropies.
    ``tile_size`` bounds the block of logits held at once; ``gather`` uses the process group, if
    any (see the module docstring for the gradient convention); ``normalize`` L2-normalises rows.
    """
    _check_pairs(image_features, text_features, tile_size)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image, text, offset, world_size = _local_and_gathered(
            image_features, text_features, normalize, gather, group
        )
        return TiledClipLoss.apply(image, text, logit_scale, offset, tile_size, world_size, group)


def naive_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: "torch.Tensor | float",
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Reference for :func:`contrastive_loss` on one process: builds the full (N, N) logits."""
    _check_pairs(image_features, text_features, 1)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image, text = _prepare(image_features, normalize), _prepare(text_features, normalize)
        logits = logit_scale.exp().to(image.dtype) * image @ text.T  # (N, N) image -> text
        labels = torch.arange(image.shape[0], device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: "torch.Tensor | float",
    logit_bias: "torch.Tensor | float",
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    gather: bool = True,
    normalize: bool = True,
    group=None,
) -> torch.Tensor:
    """SigLIP's loss (Zhai et al. 2023), exact, without an N x N matrix.

    ``-sum_ij log sigmoid(z_ij * (exp(logit_scale) * x_i . y_j + logit_bias)) / N`` with
    ``z_ij = 1`` for matching pairs and ``-1`` otherwise; SigLIP initialises ``logit_scale`` to
    :data:`SIGLIP_INIT_LOGIT_SCALE` and ``logit_bias`` to :data:`SIGLIP_INIT_LOGIT_BIAS`. Both get
    gradients. Other arguments and the multi-process convention as :func:`contrastive_loss`.
    """
    _check_pairs(image_features, text_features, tile_size)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    logit_bias = _as_scalar(logit_bias, "logit_bias", image_features)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image, text, offset, world_size = _local_and_gathered(
            image_features, text_features, normalize, gather, group
        )
        return TiledSigmoidLoss.apply(image, text, logit_scale, logit_bias, offset, tile_size, world_size, group)


def naive_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: "torch.Tensor | float",
    logit_bias: "torch.Tensor | float",
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Reference for :func:`sigmoid_loss` on one process: builds the full (N, N) logits."""
    _check_pairs(image_features, text_features, 1)
    logit_scale = _as_scalar(logit_scale, "logit_scale", image_features)
    logit_bias = _as_scalar(logit_bias, "logit_bias", image_features)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image, text = _prepare(image_features, normalize), _prepare(text_features, normalize)
        logits = logit_scale.exp().to(image.dtype) * image @ text.T + logit_bias.to(image.dtype)  # (N, N)
        signs = 2 * torch.eye(image.shape[0], dtype=image.dtype, device=image.device) - 1  # (N, N)
        return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def clamp_logit_scale_(logit_scale: torch.Tensor, max_value: float = LOGIT_SCALE_MAX) -> torch.Tensor:
    """Clamp the log-space parameter in place to ``[0, max_value]`` (scale in [1, 100])."""
    with torch.no_grad():
        return logit_scale.clamp_(0.0, max_value)


class ClipLoss(nn.Module):
    """:func:`contrastive_loss` as a module: ``loss(image_features, text_features, logit_scale)``."""

    def __init__(self, tile_size: int = DEFAULT_TILE_SIZE, gather: bool = True, normalize: bool = True):
        super().__init__()
        self.tile_size, self.gather, self.normalize = tile_size, gather, normalize

    def forward(self, image_features, text_features, logit_scale) -> torch.Tensor:
        return contrastive_loss(
            image_features, text_features, logit_scale,
            tile_size=self.tile_size, gather=self.gather, normalize=self.normalize,
        )


class SigLipLoss(nn.Module):
    """:func:`sigmoid_loss` as a module: ``loss(image_features, text_features, logit_scale, logit_bias)``."""

    def __init__(self, tile_size: int = DEFAULT_TILE_SIZE, gather: bool = True, normalize: bool = True):
        super().__init__()
        self.tile_size, self.gather, self.normalize = tile_size, gather, normalize

    def forward(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        return sigmoid_loss(
            image_features, text_features, logit_scale, logit_bias,
            tile_size=self.tile_size, gather=self.gather, normalize=self.normalize,
        )


class Objective(nn.Module):
    """``objective(image_features, text_features, logit_scale)`` -> the loss of the global batch.

    Features are the encoders' raw ``(n, embed_dim)`` outputs on this process; the loss gathers
    them across processes when there are several (see the module docstring).
    """

    def __init__(self, kind: str = "clip", tile_size: int = DEFAULT_TILE_SIZE):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind must be 'clip' or 'siglip', got {kind!r}")
        self.kind, self.tile_size = kind, tile_size
        if kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                gather: bool = True) -> torch.Tensor:
        """The loss; ``gather=False`` scores this process's pairs alone (a held-out set on rank 0)."""
        if self.kind == "siglip":
            bias = self.logit_bias.to(image_features.device)  # no-op in training; held-out features may be on the CPU
            return sigmoid_loss(image_features, text_features, logit_scale, bias, tile_size=self.tile_size, gather=gather)
        return contrastive_loss(image_features, text_features, logit_scale, tile_size=self.tile_size, gather=gather)
