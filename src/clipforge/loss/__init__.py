"""CLIP's contrastive and SigLIP's sigmoid losses: exact, tiled, gathered across ranks.

``contrastive.py`` holds the losses, their ``nn.Module`` wrappers and the training
:class:`Objective`; ``_tiled.py`` the autograd functions that walk the logits tile by tile.
"""
from .contrastive import (DEFAULT_TILE_SIZE, LOGIT_SCALE_MAX, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, ClipLoss,
                          Objective, SigLipLoss, clamp_logit_scale_, contrastive_loss, naive_contrastive_loss,
                          naive_sigmoid_loss, sigmoid_loss)

__all__ = ["DEFAULT_TILE_SIZE", "LOGIT_SCALE_MAX", "SIGLIP_INIT_LOGIT_BIAS", "SIGLIP_INIT_LOGIT_SCALE", "ClipLoss",
           "Objective", "SigLipLoss", "clamp_logit_scale_", "contrastive_loss", "naive_contrastive_loss",
           "naive_sigmoid_loss", "sigmoid_loss"]
