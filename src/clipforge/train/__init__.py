"""Training CLIP: config, optimizer and schedule, checkpoints, the loop, and the ``train`` entry point.

``train(config)`` runs one process or many (under torchrun) unchanged; see
:mod:`clipforge.train.main` for the commands.
"""
from .config import TrainConfig, apply_overrides, validate
from .main import TrainingStopped, TrainResult, train
from .presets import available_presets, load_preset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "apply_overrides",
    "available_presets",
    "load_preset",
    "train",
    "validate",
]
