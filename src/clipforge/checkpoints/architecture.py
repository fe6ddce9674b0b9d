"""The architecture of a checkpoint read off its weights, as OpenAI's ``build_model`` does.

Head counts are not stored in weights: OpenAI's rule (``width // 64``) applies, unless every shape
matches a registered preset, whose head counts are then used.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..models import ClipConfig, TextConfig, VisionConfig, available_models, get_config
from ._files import CheckpointError


def _count_blocks(state_dict: dict[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def infer_config(state_dict: dict[str, torch.Tensor], *, source: str = "state dict",
                 match_presets: bool = True) -> ClipConfig:
    """The :class:`ClipConfig` of an OpenAI-format state dict, read off its shapes as OpenAI's ``build_model``.

    Head counts are not stored in weights: OpenAI's rule (``width // 64``) applies, unless
    ``match_presets`` and every shape matches a registered preset, whose head counts are then used.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"{source}: no {key!r}; expected an OpenAI-format CLIP state dict "
                                  f"(first keys found: {list(state_dict)[:5]})")
        return tuple(state_dict[key].shape)

    if "visual.proj" in state_dict:
        width, _, patch, _ = shape("visual.conv1.weight")
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch * grid, layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
            width=width, patch_size=patch, heads=None if width >= 64 else 1,
            mlp_ratio=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0] / width,
        )
    elif "visual.layer1.0.conv1.weight" in state_dict:
        stages = tuple(_count_blocks(state_dict, f"visual.layer{i}.") for i in range(1, 5))
        grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=grid * 32, layers=stages, width=shape("visual.layer1.0.conv1.weight")[0])
    else:
        raise CheckpointError(
            f"{source}: unknown architecture: no ViT ('visual.proj') or ModifiedResNet "
            f"('visual.layer1.0.conv1.weight') image tower; first keys found: {list(state_dict)[:5]}"
        )
    text_width = shape("ln_final.weight")[0]
    text = TextConfig(
        context_length=shape("positional_embedding")[0], vocab_size=shape("token_embedding.weight")[0],
        width=text_width, heads=max(1, text_width // 64), layers=_count_blocks(state_dict, "transformer.resblocks."),
        mlp_ratio=shape("transformer.resblocks.0.mlp.c_fc.weight")[0] / text_width,
    )
    config = ClipConfig(embed_dim=shape("text_projection")[1], vision=vision, text=text)
    if match_presets:
        return _matching_preset(config) or config
    return config


def _shape_signature(config: ClipConfig) -> dict[str, Any]:
    vision = dataclasses.replace(config.vision, heads=None)
    if vision.is_resnet:  # these two do not exist in a ResNet
        vision = dataclasses.replace(vision, patch_size=0, mlp_ratio=0.0)
    return {"embed_dim": config.embed_dim, "vision": vision, "text": dataclasses.replace(config.text, heads=0)}


def _matching_preset(config: ClipConfig) -> ClipConfig | None:
    signature = _shape_signature(config)
    for name in available_models():
        preset = get_config(name)
        if _shape_signature(preset) == signature:
            return dataclasses.replace(config, vision=preset.vision, text=preset.text)
    return None
