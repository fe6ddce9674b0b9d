"""Train/eval overlap (the paper's section 5): near-duplicates of training images in an eval set."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .datasets import ClassificationData


def read_path_list(path: str | os.PathLike) -> list[str]:
    """Image paths, one per line (``#`` comments and blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a list of image paths, one per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def drop_listed(data: ClassificationData, list_path: str | os.PathLike) -> tuple[ClassificationData, list[str]]:
    """``(data without the images named in list_path, the paths dropped)``; paths compare resolved."""
    listed = {os.path.realpath(p) for p in read_path_list(list_path)}
    listed_here = [os.path.realpath(p) in listed for p in data.paths]
    keep = [i for i, is_listed in enumerate(listed_here) if not is_listed]
    dropped = [p for p, is_listed in zip(data.paths, listed_here) if is_listed]
    if not keep:
        raise ValueError(f"{list_path}: lists every one of the {len(data.paths)} images of {data.source}")
    return dataclasses.replace(data, paths=[data.paths[i] for i in keep],
                               labels=[data.labels[i] for i in keep]), dropped
