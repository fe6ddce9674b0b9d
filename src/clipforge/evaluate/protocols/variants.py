"""ImageNet's distribution shifts: V2, Sketch, R, A and O, each in its released folder layout.

- ``imagenet-v2``: folders ``0`` ... ``999`` named by class index (not wnid). Sorting them as
  strings would put ``10`` second and mislabel 990 of the 1,000 classes, so each folder's integer
  is its label.
- ``imagenet-sketch``: 1,000 wnid folders, as ImageNet.
- ``imagenet-r``, ``imagenet-a``: 200 wnid folders each (the subsets shipped in the package).
- ``imagenet-o``: 200 wnid folders (Hendrycks et al. 2021): images of classes *outside* ImageNet-1k
  that ResNet-50 confidently took for these 200 classes. Its authors use it for out-of-distribution
  detection (AUPR against ImageNet validation images of the same 200 classes, anomaly score = minus
  the top softmax probability over the 200); loaded as labelled images here (CLIP_benchmark's
  reading), so scoring gives the 200-way accuracy; the AUPR (:mod:`.ood`) comes with
  ``clipforge eval zeroshot --imagenet-val DIR`` or when ImageNet itself is in ``clipforge eval suite``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ._data import ProtocolData, describe, require_folder, wnid_table
from .imagenet import imagenet_data, list_images, read_wnid_folders


def load_imagenet_v2(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-V2 (any of its three variants): folders ``0`` ... ``999``, the folder's integer the label."""
    root = Path(path)
    require_folder(root, "the ImageNet-V2 images")
    found = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    expected = {str(i) for i in range(1000)}
    if found != expected:
        missing, unknown = expected - found, found - expected
        parts = [f"{len(missing)} missing: {describe(missing)}"] if missing else []
        parts += [f"{len(unknown)} unknown: {describe(unknown)}"] if unknown else []
        raise ValueError(f"{root}: imagenet-v2 expects 1000 class folders named 0 ... 999, found {len(found)} "
                         f"({'; '.join(parts)})")
    paths, labels, empty = [], [], []
    for label in range(1000):  # numeric order: folder "10" is class 10, not the third folder
        files = list_images(root / str(label))
        empty += [] if files else [str(label)]
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"{root}: {len(empty)} imagenet-v2 class folder(s) hold no images: {describe(empty)}")
    return imagenet_data(paths, labels, root, "imagenet-v2", wnid_table("imagenet"))


def _wnid_set(path: str | os.PathLike, dataset: str, table: str) -> ProtocolData:
    root = Path(path)
    paths, labels = read_wnid_folders(root, wnid_table(table), dataset)
    return imagenet_data(paths, labels, root, dataset, wnid_table(table))


def load_imagenet_sketch(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-Sketch: 1,000 wnid folders."""
    return _wnid_set(path, "imagenet-sketch", "imagenet")


def load_imagenet_r(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-R: its 200 wnid folders."""
    return _wnid_set(path, "imagenet-r", "imagenet_r")


def load_imagenet_a(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-A: its 200 wnid folders."""
    return _wnid_set(path, "imagenet-a", "imagenet_a")


def load_imagenet_o(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-O: its 200 wnid folders (see the module docstring for how it is scored)."""
    return _wnid_set(path, "imagenet-o", "imagenet_o")
