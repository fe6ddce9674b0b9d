"""The paper's zero-shot prompt data: class names and templates per dataset (see SOURCES.md).

    >>> from clipforge.evaluate import metadata
    >>> len(metadata.templates("imagenet")), len(metadata.classnames("cifar10"))
    (80, 10)
"""
from __future__ import annotations

import functools
import json
from importlib import resources

# Other spellings users reach for -> the stored key (compared without case, "-", "_" or spaces).
ALIASES = {
    "imagenet": "imagenet1k", "imagenetsimple": "imagenet1k_simple", "flowers102": "flowers",
    "oxfordflowers": "flowers", "oxfordpets": "pets", "stanfordcars": "cars",
    "aircraft": "fgvc_aircraft", "sst2": "renderedsst2", "clevrcounts": "clevr_count_all",
    "kitti": "kitti_closest_vehicle_distance", "patchcamelyon": "pcam", "describabletextures": "dtd",
}


@functools.lru_cache(maxsize=None)
def _load(filename: str) -> dict[str, list]:
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return json.loads(text)


def _squash(name: str) -> str:
    return "".join(char for char in name.lower() if char not in "-_ ")


def _key(name: str) -> str:
    squashed = _squash(name)
    for key in dataset_names():
        if _squash(key) == squashed:
            return key
    return ALIASES.get(squashed, name)


def dataset_names() -> list[str]:
    """Every dataset key with class names or templates, sorted."""
    return sorted(set(_load("classnames.json")) | set(_load("templates.json")))


def has_templates(name: str) -> bool:
    """Whether ``name`` (a dataset key or alias) has published templates."""
    return _key(name) in _load("templates.json")


def has_classnames(name: str) -> bool:
    """Whether ``name`` (a dataset key or alias) has published class names."""
    return _key(name) in _load("classnames.json")


def templates(name: str) -> list[str]:
    """The prompt templates of dataset ``name`` (``{}`` marks the class name)."""
    table = _load("templates.json")
    if _key(name) not in table:
        raise ValueError(f"no templates named {name!r}; known: {', '.join(sorted(table))}")
    return list(table[_key(name)])


def classnames(name: str) -> list[str | list[str]]:
    """The class names of dataset ``name`` in label order; a list entry holds synonyms."""
    table = _load("classnames.json")
    if _key(name) not in table:
        raise ValueError(f"no class names for dataset {name!r}; known: {', '.join(sorted(table))}")
    return [list(entry) if isinstance(entry, list) else entry for entry in table[_key(name)]]
