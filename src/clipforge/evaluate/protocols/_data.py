"""The data a protocol hands to scoring: labelled images plus how labels map onto prompt classes."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from ...files import why_missing
from ..datasets import ClassificationData

SCORINGS = ("subset", "1000way")


@dataclass
class ProtocolData(ClassificationData):
    """A protocol's images: ``paths[i]`` has label ``labels[i]``, named ``classes[labels[i]]``.

    Scoring embeds ``prompt_classnames`` (for the ImageNet family: the 1,000 curated names) with
    ``templates``; label ``j`` is a hit for any prompt class in ``label_hits[j]``.
    """

    dataset: str = ""  # protocol name, e.g. "imagenet-r"
    wnids: list[str] = field(default_factory=list)  # wnid (or folder) per label
    prompt_classnames: list = field(default_factory=list)  # names put into the prompts
    templates: list[str] | str = "imagenet"
    label_hits: list[list[int]] = field(default_factory=list)  # per label: prompt classes that count
    notes: list[str] = field(default_factory=list)  # what was dropped or assumed while reading
    preprocess_wrapper: Callable | None = None  # wraps the model's preprocess (border crop, tar reads)

    def wrap_preprocess(self, preprocess: Callable) -> Callable:
        """The model's ``preprocess`` with this protocol's image handling around it."""
        return self.preprocess_wrapper(preprocess) if self.preprocess_wrapper else preprocess


@functools.lru_cache(maxsize=None)
def wnid_table(name: str) -> tuple[str, ...]:
    """A shipped wnid list (``imagenet``, ``imagenet_r``, ``imagenet_a``, ``imagenet_o``); see SOURCES.md."""
    text = resources.files("clipforge.evaluate.metadata").joinpath(f"{name}_wnids.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_names() -> list:
    """The paper's 1,000 curated ImageNet class names, in wnid-sorted class order."""
    from .. import metadata

    return metadata.classnames("imagenet1k")


def describe(names, limit: int = 5) -> str:
    """``'a', 'b', ... (+N more)`` for an error message."""
    names = sorted(names)
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def require_folder(root: Path, expected: str) -> None:
    """Return when ``root`` is a folder; else a one-line error saying it is absent or a file.

    ``expected`` says what should be there, e.g. ``"the ImageNet validation images"``.
    """
    if root.is_dir():
        return
    if root.is_file():
        raise ValueError(f"{root}: is a file, not a folder (expected {expected})")
    if root.exists():
        raise ValueError(f"{root}: is not a folder (expected {expected})")
    reason = why_missing(root)
    reason = "no such folder" if reason in ("no such file or folder", "exists") else reason
    raise FileNotFoundError(f"{root}: {reason} (expected {expected})")


