"""The training objective as a module: CLIP's contrastive loss or SigLIP's sigmoid loss.

The temperature is the model's own ``logit_scale``; SigLIP's extra learnable bias lives here, so
the optimizer and checkpoints pick it up like any other parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from ..loss import DEFAULT_TILE_SIZE, SIGLIP_INIT_LOGIT_BIAS, contrastive_loss, sigmoid_loss


class Objective(nn.Module):
    """``objective(image_features, text_features, logit_scale)`` -> the loss of the global batch.

    Features are the encoders' raw ``(n, embed_dim)`` outputs on this process; the loss gathers
    them across processes when there are several (see :mod:`clipforge.loss`).
    """

    def __init__(self, kind: str = "clip", tile_size: int = DEFAULT_TILE_SIZE):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind must be 'clip' or 'siglip', got {kind!r}")
        self.kind, self.tile_size = kind, tile_size
        if kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "siglip":
            return sigmoid_loss(image_features, text_features, logit_scale, self.logit_bias, tile_size=self.tile_size)
        return contrastive_loss(image_features, text_features, logit_scale, tile_size=self.tile_size)
