"""open_clip's released layout: ``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, as open_clip pushes models to the Hugging Face Hub.

The weights use OpenAI's key names, so their shapes give the architecture; the config says what
shapes cannot: the activation (open_clip's default is exact GELU, not OpenAI's QuickGELU) and the
head counts. Settings that change the outputs without changing any shape are refused unless they
have open_clip's default value, which is what clipforge builds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..models import ClipConfig

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
# Tower settings that leave the weights' shapes unchanged, with the only value clipforge builds.
_SAME_SHAPES = {
    "vision_cfg": {"global_average_pool": False, "pool_type": "tok", "final_ln_after_pool": False,
                   "attentional_pool": False, "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None},
    "text_cfg": {"pool_type": "argmax", "no_causal_mask": False, "embed_cls": False, "final_ln_after_pool": False,
                 "act_kwargs": None, "norm_kwargs": None},
}


def open_clip_config_beside(weights: Path) -> Path | None:
    """The ``open_clip_config.json`` that describes ``weights``, when it is one of open_clip's files."""
    config = weights.parent / CONFIG_NAME
    return config if weights.name in WEIGHT_NAMES and config.is_file() else None


def open_clip_weights(folder: Path) -> Path | None:
    """The weights file of an open_clip folder (``open_clip_config.json`` + weights), if it is one."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    return next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)


def apply_open_clip_config(path: Path, inferred: ClipConfig) -> ClipConfig:
    """``inferred`` (read off the weights) with the activation and head counts of the open_clip config
    at ``path``. Raises ``ValueError`` for a config that is not open_clip's or that asks for a setting
    clipforge does not build."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    model_cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError("no \"model_cfg\" object; expected open_clip's model config")
    towers: dict[str, dict[str, Any]] = {}
    for tower, defaults in _SAME_SHAPES.items():
        sub = model_cfg.get(tower, {})
        if not isinstance(sub, dict):
            raise ValueError(f"model_cfg.{tower} is a JSON {type(sub).__name__}, expected an object")
        for name in ("hf_model_name", "timm_model_name"):
            if sub.get(name):
                raise ValueError(f"model_cfg.{tower}.{name} is {sub[name]!r}: a tower clipforge does not build")
        for name, default in defaults.items():
            if sub.get(name, default) not in (default, {} if default is None else default):
                raise ValueError(f"model_cfg.{tower}.{name} is {sub[name]!r}; clipforge builds only "
                                 f"open_clip's default ({default!r})")
        towers[tower] = sub
    quick_gelu = model_cfg.get("quick_gelu", False)  # open_clip's default: exact GELU
    if not isinstance(quick_gelu, bool):
        raise ValueError(f"model_cfg.quick_gelu is {quick_gelu!r}, expected true or false")
    vision, text = inferred.vision, inferred.text
    head_width = towers["vision_cfg"].get("head_width", 64)
    text_heads = towers["text_cfg"].get("heads", 8)
    if not (isinstance(head_width, int) and head_width > 0 and isinstance(text_heads, int) and text_heads > 0):
        raise ValueError(f"vision_cfg.head_width {head_width!r} and text_cfg.heads {text_heads!r} must be "
                         "positive integers")
    attention_width = vision.width * 32 if vision.is_resnet else vision.width  # ResNet: its attention pool's width
    return dataclasses.replace(
        inferred, quick_gelu=quick_gelu,
        vision=dataclasses.replace(vision, heads=max(1, attention_width // head_width)),
        text=dataclasses.replace(text, heads=text_heads),
    )
