"""CLIP model code: config, registry of named presets, layers, the two image towers and the pair.

Importing this package registers every preset (``presets.py``), so ``available_models`` is
complete whichever module is imported first.
"""
from . import presets  # noqa: F401  (registers the presets)
from .clip import CLIP
from .config import ClipConfig, TextConfig, VisionConfig
from .registry import available_models, create_model, get_config, register_model

__all__ = ["CLIP", "ClipConfig", "TextConfig", "VisionConfig", "available_models", "create_model", "get_config",
           "register_model"]
