"""CLIP model code: layers, the two image towers, the text tower inside :class:`CLIP`, presets."""
from .clip import CLIP

__all__ = ["CLIP"]
