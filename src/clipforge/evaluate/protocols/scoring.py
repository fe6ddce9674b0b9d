"""Zero-shot scoring under a protocol: one classifier over the prompt classes, then labels.

``subset`` scoring turns the (N, K) prompt-class logits into (N, L) label logits, each label
taking the best logit among its hit classes; for singleton hits that is exactly the columns of
the label classes, so the scores equal a zero-shot run over those class names alone. ``1000way``
keeps all K classes competing: top-k is a hit when one of the k best classes belongs to the label.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..features import encode_images
from ..metrics import confusion_matrix, mean_per_class_recall, per_class_recall, topk_accuracy
from ..prompts import resolve_templates
from ..zeroshot import ZeroShotResult, logit_scale_of, zero_shot_classifier, zero_shot_logits
from ._data import SCORINGS, ProtocolData


def _name_key(entry) -> str:
    return " ".join([entry] if isinstance(entry, str) else list(entry)).strip().lower()


def protocol_classifier(model: torch.nn.Module, classnames: Sequence, templates, **kwargs) -> torch.Tensor:
    """Class embeddings ``(D, K)`` like :func:`zero_shot_classifier`, allowing repeated names.

    The paper's ImageNet names repeat two ('missile' 657/744, 'sunglasses' 836/837): each distinct
    name is embedded once and its column repeated, as the paper's classifier has it.
    """
    distinct: dict[str, int] = {}
    for entry in classnames:
        distinct.setdefault(_name_key(entry), len(distinct))
    firsts = {}
    for entry in classnames:
        firsts.setdefault(_name_key(entry), entry)
    unique = zero_shot_classifier(model, list(firsts.values()), templates, **kwargs)  # (D, U)
    columns = torch.tensor([distinct[_name_key(entry)] for entry in classnames], device=unique.device)
    return unique[:, columns].contiguous()  # (D, K)


def label_logits(class_logits: torch.Tensor, label_hits: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(N, L)``: for each label the highest of ``class_logits`` (N, K) over its hit classes."""
    columns = torch.tensor([c for hits in label_hits for c in hits], dtype=torch.long)
    owners = torch.tensor([label for label, hits in enumerate(label_hits) for _ in hits], dtype=torch.long)
    picked = class_logits[:, columns]  # (N, H)
    out = class_logits.new_full((class_logits.shape[0], len(label_hits)), float("-inf"))
    return out.scatter_reduce_(1, owners.expand_as(picked), picked, reduce="amax")  # (N, L)


def _hit_table(label_hits: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    table = torch.zeros(len(label_hits), num_classes, dtype=torch.bool)  # (L, K)
    for label, hits in enumerate(label_hits):
        table[label, list(hits)] = True
    return table


@dataclass
class ProtocolResult(ZeroShotResult):
    """A :class:`ZeroShotResult` with the protocol and scoring it used.

    ``logits`` are label logits (N, L) under ``subset`` and prompt-class logits (N, K) under
    ``1000way``; ``predictions`` are labels (-1: a class outside every label, ``1000way`` only).
    """

    dataset: str = ""
    scoring: str = "subset"
    predictions: torch.Tensor | None = None  # (M,)
    notes: list[str] | None = None

    def to_report(self) -> dict:
        num_labels = len(self.classes)
        outside = torch.where(self.predictions < 0, num_labels, self.predictions)  # "no label" column
        recall, support = per_class_recall(outside, self.targets, num_labels + 1)
        return {
            "dataset": self.dataset, "scoring": self.scoring, "metrics": self.metrics,
            "num_images": len(self.targets), "num_classes": num_labels, "num_templates": self.num_templates,
            "per_class": [
                {"class": c, "recall": None if s == 0 else float(r), "support": int(s)}
                for c, r, s in zip(self.classes, recall.tolist(), support.tolist())
            ],
            "confusion_matrix": self.confusion.tolist(),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "notes": list(self.notes or []),
        }


def _metrics_1000way(class_logits: torch.Tensor, targets: torch.Tensor, label_hits, num_labels: int):
    table = _hit_table(label_hits, class_logits.shape[1])  # (L, K)
    ranked = class_logits.topk(min(5, class_logits.shape[1]), dim=-1).indices  # (M, k)
    hit = table[targets].gather(1, ranked)  # (M, k) whether each of the k best belongs to the label
    owner = torch.full((class_logits.shape[1],), -1, dtype=torch.long)
    for label in reversed(range(num_labels)):
        owner[table[label]] = label
    predictions = owner[ranked[:, 0]]  # (M,) -1 when the top class is in no label
    predictions = torch.where(hit[:, 0], targets, predictions)  # a class shared by labels counts as the target
    metrics = {"top1": float(hit[:, 0].float().mean())}
    if num_labels >= 5:
        metrics["top5"] = float(hit.any(dim=1).float().mean())
    outside = torch.where(predictions < 0, num_labels, predictions)
    recall, support = per_class_recall(outside, targets, num_labels + 1)
    metrics["mean_per_class_recall"] = float(recall[:num_labels][support[:num_labels] > 0].mean())
    return metrics, predictions


def evaluate_protocol(model: torch.nn.Module, data: ProtocolData, scoring: str = "subset", templates=None,
                      preprocess: Callable | None = None, batch_size: int = 64, num_workers: int = 0,
                      device: str | torch.device | None = None, precision: str = "fp32",
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ProtocolResult:
    """Top-1, top-5 and mean per-class recall of ``model`` on ``data`` under its protocol.

    ``scoring``: ``subset`` (labels' classes only) or ``1000way`` (every prompt class competes).
    ``templates`` default to the protocol's (the paper's 80 for the ImageNet family).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if preprocess is None:
        from ...transforms import image_transform

        preprocess = image_transform(model.config.vision.image_size)
    template_list = resolve_templates(data.templates if templates is None else templates)
    classifier = protocol_classifier(model, data.prompt_classnames, template_list, device=device,
                                     precision=precision, cache_dir=cache_dir, progress=progress)  # (D, K)
    features = encode_images(model, data.paths, data.wrap_preprocess(preprocess), batch_size, num_workers,
                             device, precision, cache_dir, progress, desc=data.dataset or "images")
    if len(features.indices) == 0:
        raise ValueError(f"{data.source}: none of the {len(data.paths)} images could be read, "
                         f"e.g. {features.skipped[0][0]} ({features.skipped[0][1]})")
    class_logits = zero_shot_logits(features.features, classifier, logit_scale_of(model)).cpu()  # (M, K)
    targets = torch.tensor(data.labels)[features.indices]  # (M,)
    num_labels = len(data.classes)
    if scoring == "subset":
        logits = label_logits(class_logits, data.label_hits)  # (M, L)
        metrics = {f"top{k}": value for k, value in topk_accuracy(logits, targets, ks=(1, 5)).items()}
        predictions = logits.argmax(dim=-1)
        metrics["mean_per_class_recall"] = mean_per_class_recall(predictions, targets, num_labels)
    else:
        logits = class_logits
        metrics, predictions = _metrics_1000way(class_logits, targets, data.label_hits, num_labels)
    outside = torch.where(predictions < 0, num_labels, predictions)
    confusion = confusion_matrix(outside, targets, num_labels + 1)[:num_labels, :num_labels]
    return ProtocolResult(
        classes=list(data.classes), classnames=list(data.classes), num_templates=len(template_list),
        logits=logits, indices=features.indices, targets=targets, metrics=metrics, confusion=confusion,
        skipped=features.skipped, dataset=data.dataset, scoring=scoring, predictions=predictions,
        notes=list(data.notes),
    )
