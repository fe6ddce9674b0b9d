"""The standard evaluation sets' protocols: ImageNet and its distribution shifts, ObjectNet,
CLIP_benchmark's webdataset folders.

    from clipforge.evaluate import load_classification_data
    from clipforge.evaluate.protocols import evaluate_protocol
    data = load_classification_data("/data/imagenet-r", dataset="imagenet-r")
    result = evaluate_protocol(model, data)            # 1,000-way logits masked to the 200 classes
    result = evaluate_protocol(model, data, "1000way")  # all 1,000 ImageNet classes compete

Every ImageNet-family set is scored with one 1,000-class zero-shot classifier (the paper's curated
names and 80 templates); a set's labels name which of those classes count as a hit. ``subset``
scoring (the default, as in Hendrycks et al. and the CLIP paper's testbed) keeps only the classes
the set uses: a label's logit is the highest logit among its classes. ``1000way`` lets every
ImageNet class compete and counts a hit when the top one belongs to the label.
"""
from __future__ import annotations

import os
from typing import Callable

from ._data import SCORINGS, ProtocolData
from .scoring import ProtocolResult, evaluate_protocol, label_logits, protocol_classifier

# name -> "module:function" reading that layout; imported on first use.
_LOADERS = {
    "imagenet": "imagenet:load_imagenet",
    "imagenet-v2": "variants:load_imagenet_v2",
    "imagenet-sketch": "variants:load_imagenet_sketch",
    "imagenet-r": "variants:load_imagenet_r",
    "imagenet-a": "variants:load_imagenet_a",
    "imagenet-o": "variants:load_imagenet_o",
    "objectnet": "objectnet:load_objectnet",
    "wds": "clip_benchmark_wds:load_wds_classification",
}
PROTOCOL_NAMES = tuple(_LOADERS)
# Shifted sets the paper plots against ImageNet for effective robustness.
SHIFTED = ("imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet")


def canonical_name(name: str) -> str:
    """``name`` spelled as in :data:`PROTOCOL_NAMES` (case, ``_`` and common aliases forgiven)."""
    key = name.strip().lower().replace("_", "-")
    key = {"imagenet1k": "imagenet", "imagenetv2": "imagenet-v2", "imagenet-1k": "imagenet",
           "imagenet-val": "imagenet"}.get(key, key)
    if key.startswith("wds/"):
        key = "wds"
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(PROTOCOL_NAMES)}")
    return key


def _loader(name: str) -> Callable[[str | os.PathLike], ProtocolData]:
    import importlib

    module, function = _LOADERS[canonical_name(name)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def load_protocol_data(path: str | os.PathLike, dataset: str) -> ProtocolData:
    """The :class:`ProtocolData` of ``dataset`` (one of :data:`PROTOCOL_NAMES`) read from ``path``.

    A layout that does not match the protocol (missing or unknown class folders, wrong count, no
    ground truth) raises ``ValueError`` naming what was expected and what was found.
    """
    return _loader(dataset)(path)


def looks_like_wds(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CLIP_benchmark webdataset folder (``classnames.txt`` and ``test/*.tar``)."""
    from .clip_benchmark_wds import is_wds_folder

    return is_wds_folder(path)


__all__ = ["PROTOCOL_NAMES", "SCORINGS", "SHIFTED", "ProtocolData", "ProtocolResult", "canonical_name",
           "evaluate_protocol", "label_logits", "load_classification_data", "load_protocol_data", "looks_like_wds",
           "protocol_classifier"]


def load_classification_data(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                             dataset: str | None = None):
    """An image folder or ``path,label`` CSV/TSV; or, with ``dataset`` (``imagenet``, ``imagenet-r``,
    ``objectnet``, ...), that protocol's :class:`ProtocolData` (see the module docstring)."""
    from ..datasets import load_classification_data as load_listed

    if dataset is None:
        return load_listed(path, image_root)
    return load_protocol_data(path, dataset)
