"""The calibration set of ``--calibration DIR``: its images, its classes when it has them, and prompts.

A folder with one sub-folder per class is read as ``clipforge eval zeroshot`` reads it (so the
report can give zero-shot top-1); any other folder is searched recursively for images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.captions import is_image_name

CALIBRATION_TEMPLATE = "a photo of {}."  # prompts for the text tower's calibration and cosine


@dataclass
class CalibrationSet:
    """Image paths, their class labels (or None), and one prompt per class or image."""

    paths: list[str]
    labels: list[int] | None  # class index per path, when the folder has class sub-folders
    classes: list[str] | None  # class folder names, in label order
    prompts: list[str]
    source: str
    note: str | None = None  # why class sub-folders were not read as classes, when they were not


def read_calibration_folder(folder: str | os.PathLike) -> CalibrationSet:
    """The images under ``folder``; ``FileNotFoundError`` / ``ValueError`` naming it when there are none."""
    from ..evaluate import load_image_folder

    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--calibration {root}: is a file; expected a folder of images (or of class sub-folders)")
    if not root.is_dir():
        raise FileNotFoundError(f"--calibration {root}: no such folder")
    note = None
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        try:
            data = load_image_folder(root)
        except ValueError as error:  # sub-folders that are not classes (some empty): fall back to every image
            data = None
            note = f"its sub-folders are not read as classes ({error}), so the report has no zero-shot top-1"
        if data is not None and len(data.classes) > 1:
            names = [" ".join(c.replace("_", " ").split()) for c in data.classes]
            return CalibrationSet(data.paths, data.labels, data.classes,
                                  [CALIBRATION_TEMPLATE.format(n) for n in names], str(root))
    paths = sorted(str(Path(d) / n) for d, _, names in os.walk(root) for n in names
                   if is_image_name(n) and not n.startswith("."))
    if not paths:
        raise ValueError(f"--calibration {root}: no images found (expected image files or one sub-folder per class)")
    stems = [" ".join(Path(p).stem.replace("_", " ").replace("-", " ").split()) for p in paths]
    return CalibrationSet(paths, None, None, [CALIBRATION_TEMPLATE.format(s) for s in stems], str(root), note)


# onnxruntime's MinMax calibrator keeps every intermediate tensor of every calibration batch in
# memory (about 2.5 GB for ViT-B/32 on 200 images; its flush option drops data in 1.32), so static
# calibration uses at most this many images; the accuracy report still covers the whole folder.
CALIBRATION_LIMIT = 256


def spread(count: int, limit: int) -> list[int]:
    """All of ``range(count)``, the ``limit`` evenly spaced indices first (so a calibration sample of a
    class-sorted folder covers every class, not the first few), then the rest in order."""
    if count <= limit:
        return list(range(count))
    first = [i * count // limit for i in range(limit)]  # distinct, since count > limit
    chosen = set(first)
    return first + [i for i in range(count) if i not in chosen]


def image_batches(paths: list[str], preprocess: Callable, batch_size: int = 32,
                  limit: int = CALIBRATION_LIMIT, source: str | None = None) -> list[np.ndarray]:
    """Preprocessed float32 batches ``(B, 3, S, S)`` of up to ``limit`` readable images, spread evenly
    over ``paths`` (an unreadable one is replaced by the next readable path); ``ValueError`` naming
    ``source`` (the ``--calibration`` folder) when none can be read."""
    tensors = []
    for index in spread(len(paths), limit):
        if len(tensors) == limit:
            break
        try:
            tensors.append(preprocess(paths[index]))
        except Exception:  # an unreadable file only costs one calibration sample
            continue
    if not tensors:
        where = f"--calibration {source}: " if source else ""
        raise ValueError(f"{where}none of the {len(paths)} images could be read as an image, e.g. {paths[0]}")
    return [torch.stack(tensors[i:i + batch_size]).numpy() for i in range(0, len(tensors), batch_size)]


def token_batches(prompts: list[str], context_length: int, batch_size: int = 64,
                  limit: int = CALIBRATION_LIMIT) -> list[np.ndarray]:
    """Token batches ``(B, L)`` int64 of the prompts, each trimmed to its last end-of-text as the runtime feeds them."""
    from ..tokenizer import tokenize

    batches = []
    for start in range(0, min(len(prompts), limit), batch_size):
        tokens = tokenize(prompts[start:start + batch_size], context_length=context_length, truncate=True)
        batches.append(tokens[:, : int(tokens.argmax(-1).max()) + 1].numpy())  # (B, L')
    return batches
