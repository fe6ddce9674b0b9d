"""ObjectNet 1.0: 313 object folders, of which 113 map to ImageNet classes through the release's
``mappings/`` files, read from the user's copy (nothing of ObjectNet ships with clipforge).

The mapping is the one the release defines and wise-ft / CLIP_benchmark read:
``folder_to_objectnet_label.json`` (folder -> ObjectNet label), ``objectnet_to_imagenet_1k.json``
(ObjectNet label -> ImageNet labels joined by ``"; "``), ``imagenet_to_label_2012_v2`` (the ImageNet
label of each 2012 id, one per line) and ``pytorch_to_imagenet_2012_id.json`` (class index in
wnid-sorted order -> 2012 id). Images of the 200 unmapped folders are left out. Labels follow the
sorted folder names; a label is a hit for any ImageNet class mapped to it. Every image loses the
release's 2-pixel border before preprocessing (each side), as the release's own code does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ...transforms import load_image
from ...files import read_utf8
from ._data import ProtocolData, describe, imagenet_names, require_folder
from .imagenet import list_images

NUM_FOLDERS = 313
BORDER_PIXELS = 2
MAPPING_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                 "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


class BorderCrop:
    """``preprocess`` applied after cutting ``pixels`` off every side (picklable for workers)."""

    def __init__(self, preprocess: Callable, pixels: int = BORDER_PIXELS):
        self.preprocess, self.pixels = preprocess, pixels

    def __call__(self, image):
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        width, height = image.size
        if width <= 2 * self.pixels or height <= 2 * self.pixels:
            raise ValueError(f"image of {width}x{height} pixels is too small for a {self.pixels}-pixel border crop")
        return self.preprocess(image.crop((self.pixels, self.pixels, width - self.pixels, height - self.pixels)))

    def __repr__(self) -> str:  # part of the feature-cache key
        return f"BorderCrop({self.pixels}, {self.preprocess!r})"


def _layout(root: Path) -> tuple[Path, Path]:
    """``(images folder, mappings folder)`` of a release unpacked at or under ``root``."""
    for base in (root, root / "objectnet-1.0"):
        if (base / "images").is_dir():
            for mappings in (base / "mappings", root / "mappings", root):
                if all((mappings / name).is_file() for name in MAPPING_FILES):
                    return base / "images", mappings
            raise ValueError(f"{root}: ObjectNet needs the release's mappings ({', '.join(MAPPING_FILES)}) in "
                             f"{base / 'mappings'}")
    raise ValueError(f"{root}: expected the ObjectNet release (images/ and mappings/, or objectnet-1.0/ holding them)")


def _read_object(path: Path, expected: str) -> dict:
    """The JSON object in ``path``; a one-line error naming the file and ``expected`` otherwise."""
    try:
        value = json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, dict):
        found = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")
        raise ValueError(f"{path}: expected a JSON object of {expected}, found {found}")
    return value


def _strings(path: Path, expected: str) -> dict[str, str]:
    """``path``'s JSON object, every value a string (``expected`` names what keys and values hold)."""
    mapping = _read_object(path, expected)
    bad = next((key for key, value in mapping.items() if not isinstance(value, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: {bad!r} maps to {mapping[bad]!r}; expected a JSON object of {expected}")
    return mapping


def _as_int(value) -> int | None:
    """``value`` as an integer when it is a JSON integer or a string of digits, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def _class_of_id(path: Path) -> dict[int, int]:
    """2012 id -> ImageNet class index, from ``pytorch_to_imagenet_2012_id.json``."""
    expected = "class index (0..999) -> ImageNet 2012 id (an integer)"
    class_of_id = {}
    for key, value in _read_object(path, expected).items():
        index, number = _as_int(key), _as_int(value)
        if index is None or not 0 <= index < 1000 or number is None:
            raise ValueError(f"{path}: {key!r} maps to {value!r}; expected a JSON object of {expected}")
        if number in class_of_id:
            raise ValueError(f"{path}: classes {class_of_id[number]} and {index} both map to 2012 id {number}")
        class_of_id[number] = index
    return class_of_id


def folder_to_imagenet(mappings: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """``({folder: [ImageNet class index, ...]}, {folder: ObjectNet label})`` for the mapped folders.

    Each mapping file's structure is checked: a wrong one raises ``ValueError`` naming the file.
    """
    paths = [mappings / name for name in MAPPING_FILES]
    folder_of = {label: folder for folder, label in
                 _strings(paths[0], "folder name -> ObjectNet label (a string)").items()}
    to_imagenet = _strings(paths[1], 'ObjectNet label -> ImageNet labels (a string joined by "; ")')
    class_of_id = _class_of_id(paths[2])
    class_of_label = {}
    for number, line in enumerate(read_utf8(paths[3]).splitlines()):
        if not line.strip():
            continue
        if number not in class_of_id:
            raise ValueError(f"{paths[3]}: line {number + 1} ({line.strip()!r}) is 2012 id {number}, which "
                             f"{MAPPING_FILES[2]} gives no class; expected one ImageNet label per id it maps "
                             f"({len(class_of_id)} ids)")
        class_of_label[line.strip()] = class_of_id[number]
    hits, labels = {}, {}
    for objectnet_label, imagenet_labels in to_imagenet.items():
        if objectnet_label not in folder_of:
            raise ValueError(f"{paths[1]}: label {objectnet_label!r} has no folder in {MAPPING_FILES[0]}")
        unknown = [name for name in imagenet_labels.split("; ") if name not in class_of_label]
        if unknown:
            raise ValueError(f"{paths[1]}: ImageNet label(s) {unknown} of {objectnet_label!r} "
                             f"are not in {MAPPING_FILES[3]}")
        folder = folder_of[objectnet_label]
        hits[folder] = sorted(class_of_label[name] for name in imagenet_labels.split("; "))
        labels[folder] = objectnet_label
    return hits, labels


def load_objectnet(path: str | os.PathLike) -> ProtocolData:
    """ObjectNet's 113 ImageNet-mapped classes from the release at ``path`` (module docstring)."""
    root = Path(path)
    require_folder(root, "the ObjectNet release")
    images, mappings = _layout(root)
    folders = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) != NUM_FOLDERS:
        raise ValueError(f"{images}: ObjectNet 1.0 has {NUM_FOLDERS} object folders, found {len(folders)}")
    hits, objectnet_labels = folder_to_imagenet(mappings)
    missing = set(hits) - set(folders)
    if missing:
        raise ValueError(f"{images}: {len(missing)} folders named in the mappings are absent: {describe(missing)}")
    mapped = sorted(hits)
    paths, labels, empty = [], [], []
    for label, folder in enumerate(mapped):
        files = list_images(images / folder)
        empty += [] if files else [folder]
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"{images}: {len(empty)} mapped ObjectNet folder(s) hold no images: {describe(empty)}")
    return ProtocolData(
        paths=paths, labels=labels, classes=[objectnet_labels[f] for f in mapped], source=str(root),
        dataset="objectnet", wnids=mapped, prompt_classnames=imagenet_names(), templates="imagenet",
        label_hits=[hits[f] for f in mapped], preprocess_wrapper=BorderCrop,
        notes=[f"{len(mapped)} of {len(folders)} folders map to ImageNet classes; the others are left out",
               f"images cropped by {BORDER_PIXELS} pixels on each side"],
    )
