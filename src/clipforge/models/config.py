"""Typed configuration of a CLIP model: one dataclass per tower plus the pair.

The fields are exactly what OpenAI's ``build_model`` reads off a checkpoint, so a config can be
inferred from released weights and a model rebuilt from a config alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def check_patch_dropout(value: float, is_resnet: bool = False) -> None:
    """Raise ValueError unless ``value`` is a usable patch-dropout share for this image tower."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"patch_dropout must lie in [0, 1), got {value!r}")
    if value and is_resnet:
        raise ValueError(f"patch_dropout={value} needs a ViT image tower; a ResNet has no patch tokens to drop")


@dataclass
class VisionConfig:
    image_size: int = 224  # input resolution (square)
    layers: int | tuple[int, ...] = 12  # an int builds a ViT; a 4-tuple builds a ModifiedResNet
    width: int = 768  # ViT hidden size, or the ResNet stem width (64 for RN50)
    patch_size: int = 32  # ViT only: side of a square patch
    heads: int | None = None  # None: width // 64 (ViT) or width * 32 // 64 (ResNet), as OpenAI
    mlp_ratio: float = 4.0  # ViT only: MLP hidden = width * mlp_ratio
    # ViT only: share of patch tokens dropped per image in training mode (FLIP, Li et al. 2023);
    # evaluation and inference always see every patch. 0 turns it off.
    patch_dropout: float = 0.0

    def __post_init__(self):
        check_patch_dropout(self.patch_dropout, self.is_resnet)

    @property
    def is_resnet(self) -> bool:
        return not isinstance(self.layers, int)

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width * 32 // 64 if self.is_resnet else self.width // 64


@dataclass
class TextConfig:
    context_length: int = 77  # positions in the text tower (tokenizer pads to this)
    vocab_size: int = 49408  # CLIP BPE: 256 bytes x2 (with </w>) + 48,894 merges + sot + eot
    width: int = 512  # transformer hidden size
    heads: int = 8  # attention heads
    layers: int = 12  # residual attention blocks
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio


@dataclass
class ClipConfig:
    embed_dim: int = 512  # size of the joint image-text embedding
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True  # OpenAI's weights use QuickGELU; LAION-trained ones use exact GELU
    init_logit_scale: float = math.log(1 / 0.07)  # temperature init from the paper

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClipConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise so typos do not pass silently."""
        data = dict(data)
        vision = dict(data.pop("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        text = dict(data.pop("text", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ClipConfig fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **data)
