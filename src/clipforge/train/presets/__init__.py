"""Training presets: small Python (``config() -> TrainConfig``) or TOML files, one per experiment.

``load_preset("tiny")`` finds ``tiny.py`` or ``tiny.toml`` in this folder; a path to a ``.py`` or
``.toml`` file anywhere works the same way. A TOML preset lists only what differs from the
defaults, in tables named like the config sections (``[optim]``, ``[model]`` ...).
"""
from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from ...files import read_utf8
from ..config import TrainConfig

_HERE = Path(__file__).parent


def available_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in _HERE.iterdir() if p.suffix in (".py", ".toml") and not p.stem.startswith("_"))


def load_preset(name_or_path: str) -> TrainConfig:
    """The :class:`TrainConfig` of a bundled preset name or of a ``.py`` / ``.toml`` file."""
    path = Path(name_or_path)
    if path.suffix in (".py", ".toml") and not path.is_file():
        raise FileNotFoundError(f"preset {name_or_path}: no such file" if not path.exists() else
                                f"preset {name_or_path}: not a file")
    if path.suffix not in (".py", ".toml"):
        bundled = [_HERE / f"{name_or_path.replace('-', '_')}{suffix}" for suffix in (".py", ".toml")]
        found = [p for p in bundled if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"preset {name_or_path!r} is neither a .py/.toml file nor a bundled preset "
                f"({', '.join(available_presets())})"
            )
        path = found[0]
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(read_utf8(path))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"preset {path}: invalid TOML ({error})") from None
        try:
            return TrainConfig.from_dict(data)
        except ValueError as error:
            raise ValueError(f"preset {path}: {error}") from None
    spec = importlib.util.spec_from_file_location(f"clipforge_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (SyntaxError, ImportError) as error:  # the preset's own mistake, not clipforge's
        syntax = isinstance(error, SyntaxError)
        where = f" (line {error.lineno})" if syntax and error.lineno else ""
        raise ValueError(f"preset {path}{where}: {type(error).__name__}: {error.msg if syntax else error}") from None
    if not callable(getattr(module, "config", None)):
        raise ValueError(f"preset {path} must define config() returning a TrainConfig")
    config = module.config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"preset {path}: config() returned {type(config).__name__}, expected TrainConfig")
    return config
