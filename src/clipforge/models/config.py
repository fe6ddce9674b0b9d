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
    # evaluation and inference always see every patch. 0 turns it off. A training setting, not part
    # of the architecture: left out of equality, so a model trained with it still names its preset.
    patch_dropout: float = field(default=0.0, compare=False)

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
        """Inverse of :meth:`to_dict`, checked field by field (:func:`check_config_dict`): an unknown
        key, a wrong type or an out-of-range value raises ``ValueError`` naming the field."""
        check_config_dict(data)
        data = dict(data)
        vision = dict(data.pop("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        text = dict(data.pop("text", {}))
        config = cls(vision=VisionConfig(**vision), text=TextConfig(**text), **data)
        _check_shapes(config)
        return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(where: str, name: str, value: Any, kind: Any) -> None:
    """One field of a config dict against its declared type; positive where it is a size."""
    key = f"{where}{name}"
    if kind is bool or kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"field {key} must be true or false, got {value!r}")
        return
    if name == "heads" and value is None:
        return
    if name == "layers" and where == "vision." and isinstance(value, (list, tuple)):
        if len(value) != 4 or not all(_is_int(v) and v >= 1 for v in value):
            raise ValueError(f"field {key} must be a positive integer (ViT) or a list of 4 (ResNet), got {value!r}")
        return
    if kind in (float, "float"):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ValueError(f"field {key} must be a finite number, got {value!r}")
        if name == "mlp_ratio" and value <= 0:
            raise ValueError(f"field {key} must be > 0, got {value!r}")
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"field {key} must be a positive integer, got {value!r}")


def check_config_dict(data: Any) -> None:
    """Raise ``ValueError`` naming the first field of a model config dict that is unknown, of the
    wrong type (``"128"``, ``4.5``, ``"no"`` for a boolean) or out of range (``0``, ``-128``)."""
    if not isinstance(data, dict):
        raise ValueError(f"a model config must be a JSON object, got {type(data).__name__}")
    for where, cls, section in (("", ClipConfig, data), ("vision.", VisionConfig, data.get("vision", {})),
                                ("text.", TextConfig, data.get("text", {}))):
        if not isinstance(section, dict):
            raise ValueError(f"field {where.rstrip('.')} must be an object, got {type(section).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise ValueError(f"unknown ClipConfig fields {[where + name for name in unknown]}; "
                             f"expected some of {sorted(fields)}")
        for name, value in section.items():
            if name not in ("vision", "text") or where:
                _check_field(where, name, value, fields[name])


def _check_shapes(config: ClipConfig) -> None:
    """The sizes must fit together: heads divide widths, patches tile the image."""
    vision, text = config.vision, config.text
    if not vision.is_resnet and vision.image_size % vision.patch_size:
        raise ValueError(f"field vision.image_size {vision.image_size} is not a multiple of "
                         f"vision.patch_size {vision.patch_size}")
    if vision.is_resnet and vision.image_size % 32:
        raise ValueError(f"field vision.image_size {vision.image_size} must be a multiple of 32 for a ResNet")
    attention_width = vision.width * 32 if vision.is_resnet else vision.width
    if vision.num_heads < 1 or attention_width % vision.num_heads:
        raise ValueError(f"field vision.heads: {vision.num_heads} heads do not divide the attention width "
                         f"{attention_width}")
    if text.width % text.heads:
        raise ValueError(f"field text.heads: {text.heads} heads do not divide text.width {text.width}")
