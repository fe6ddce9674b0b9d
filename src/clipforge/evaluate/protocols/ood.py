"""ImageNet-O scored as its authors score it: out-of-distribution detection, not accuracy.

Hendrycks et al. (2021, "Natural Adversarial Examples") treat ImageNet-O's images as anomalies and
ImageNet validation images of the same 200 classes as the normal ones; a model's anomaly score is
minus its maximum softmax probability over those 200 classes, and the metric is the area under the
precision-recall curve with the ImageNet-O images as the positive class (higher is better).

    from clipforge.evaluate.protocols.ood import imagenet_o_aupr, imagenet_o_classes, in_distribution
    val = in_distribution(load_protocol_data("/data/imagenet/val", "imagenet"))  # the 200 classes' images
    aupr = imagenet_o_aupr(evaluate_protocol(model, val), evaluate_protocol(model, imagenet_o))
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ._data import ProtocolData, wnid_table


def imagenet_o_classes() -> list[int]:
    """ImageNet-1k class indices of ImageNet-O's 200 classes, in ImageNet-O's label order."""
    index = {wnid: i for i, wnid in enumerate(wnid_table("imagenet"))}
    return [index[wnid] for wnid in wnid_table("imagenet_o")]


def in_distribution(imagenet: ProtocolData) -> ProtocolData:
    """``imagenet`` (the ``imagenet`` protocol's data) cut to the images of ImageNet-O's 200 classes:
    the normal images of the detection task, a fifth of the validation set."""
    if imagenet.dataset != "imagenet":
        raise ValueError(f"{imagenet.source}: ImageNet-O's in-distribution images come from ImageNet "
                         f"validation (the imagenet protocol), got {imagenet.dataset or 'a plain folder'}")
    keep = set(imagenet_o_classes())
    rows = [(path, label) for path, label in zip(imagenet.paths, imagenet.labels) if label in keep]
    return replace(imagenet, paths=[path for path, _ in rows], labels=[label for _, label in rows],
                   notes=[*imagenet.notes, "kept the images of ImageNet-O's 200 classes"])


def _max_softmax(logits: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """``(N,)`` the top softmax probability over the ``subset`` classes; ``logits`` hold either all
    1,000 ImageNet classes (``imagenet``, ``1000way``) or already just the subset (``subset`` scoring)."""
    if logits.shape[1] != len(subset):
        logits = logits[:, subset]  # (N, 200)
    return logits.float().softmax(-1).max(-1).values


def imagenet_o_aupr(imagenet, imagenet_o, subset: list[int] | None = None) -> float:
    """The detection AUPR from an ImageNet result and an ImageNet-O result (either scoring).

    ``subset``: ImageNet class indices of the 200 classes (default :func:`imagenet_o_classes`);
    ImageNet images outside them are left out, as the authors leave them out.
    """
    from sklearn.metrics import average_precision_score

    subset = imagenet_o_classes() if subset is None else list(subset)
    keep = torch.isin(imagenet.targets, torch.tensor(subset))
    if not bool(keep.any()):
        raise ValueError("ImageNet-O's AUPR needs ImageNet validation images of its 200 classes; none were scored")
    in_scores = -_max_softmax(imagenet.logits[keep], subset)  # (N_in,) higher: more anomalous
    out_scores = -_max_softmax(imagenet_o.logits, subset)  # (N_out,)
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]  # ImageNet-O images are the positives
    return float(average_precision_score(labels, torch.cat([in_scores, out_scores]).numpy()))
