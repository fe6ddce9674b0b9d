"""Named model presets: ``register_model`` functions that return a :class:`ClipConfig`.

Presets are registered in ``models/presets.py``, which ``clipforge.models`` imports eagerly;
this module never imports it back, so there is no import cycle. Tests parametrize over the registry.
"""
from __future__ import annotations

from typing import Callable

from .clip import CLIP
from .config import ClipConfig

_PRESETS: dict[str, Callable[[], ClipConfig]] = {}


def register_model(name: str) -> Callable[[Callable[[], ClipConfig]], Callable[[], ClipConfig]]:
    """Decorator: register a function returning the :class:`ClipConfig` of preset ``name``."""

    def wrap(fn: Callable[[], ClipConfig]) -> Callable[[], ClipConfig]:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is registered twice")
        _PRESETS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    """Names of all registered presets, OpenAI's nine first, in registration order."""
    return list(_PRESETS)


def get_config(name: str) -> ClipConfig:
    """The config of preset ``name``; raises ``ValueError`` listing the known names."""
    names = available_models()
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(names)}")
    return _PRESETS[name]()


def create_model(name_or_config: "str | ClipConfig") -> CLIP:
    """A randomly initialised :class:`CLIP` from a preset name or a :class:`ClipConfig`."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return CLIP(config)
