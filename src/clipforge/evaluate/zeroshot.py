"""Zero-shot classification: class embeddings from prompts, images scored by cosine similarity.

For each class every template is filled with the class name (and each synonym, when a class is a
list of names), the prompts are embedded and L2-normalised, averaged, and normalised again: the
paper's prompt ensembling. The stacked class embeddings form a (embed_dim, classes) matrix, so
``logit_scale * normalize(image_features) @ classifier`` gives the logits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .datasets import ClassificationData
from .features import encode_images, encode_texts, model_device
from .metrics import confusion_matrix, mean_per_class_recall, per_class_recall, require_finite, topk_accuracy
from .prompts import check_classnames, class_synonyms, fill_template, resolve_classnames, resolve_templates

def zero_shot_classifier(model: torch.nn.Module, classnames: Sequence, templates=None,
                         tokenizer: Callable | None = None, device: str | torch.device | None = None,
                         batch_size: int = 256, precision: str = "fp32",
                         cache_dir: str | os.PathLike | None = None, progress: bool = False) -> torch.Tensor:
    """Class embeddings ``(embed_dim, num_classes)`` by prompt ensembling, L2-normalised per class.

    ``classnames``: a name per class, or a list of synonyms. ``templates``: see
    :func:`resolve_templates` (None: the bare class name). Returned on ``device`` (default: the
    model's).
    """
    check_classnames(classnames)
    templates = resolve_templates(templates)
    device = torch.device(device) if device is not None else model_device(model)
    prompts, owners = [], []
    for class_index, entry in enumerate(classnames):
        for name in class_synonyms(entry):
            prompts += [fill_template(template, name) for template in templates]
            owners += [class_index] * len(templates)
    prompt_features = encode_texts(model, prompts, tokenizer, batch_size, device, precision, cache_dir,
                                   progress, desc="prompts")
    prompt_features = F.normalize(prompt_features, dim=-1)  # (P, D)
    owners = torch.tensor(owners)  # (P,)
    sums = torch.zeros(len(classnames), prompt_features.shape[1]).index_add_(0, owners, prompt_features)
    means = sums / torch.bincount(owners, minlength=len(classnames))[:, None]  # (C, D)
    return F.normalize(means, dim=-1).t().contiguous().to(device)  # (D, C)


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                     logit_scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """``logit_scale * cosine`` of images (N, D) against class embeddings (D, C): (N, C)."""
    image_features = F.normalize(image_features.float(), dim=-1)
    return float(logit_scale) * image_features @ classifier.to(image_features.device).float()


def zero_shot_predict(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(N, C)`` for a preprocessed batch ``(N, 3, H, W)``: softmax of
    ``exp(logit_scale) * cosine`` against a :func:`zero_shot_classifier` matrix."""
    with torch.no_grad():
        features = model.encode_image(images.to(model_device(model)))
    return zero_shot_logits(features, classifier, logit_scale_of(model)).softmax(dim=-1)


def logit_scale_of(model: torch.nn.Module) -> float:
    """The model's learned temperature ``exp(logit_scale)``, or 100 (OpenAI's cap) if it has none."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


def _default_preprocess(model: torch.nn.Module) -> Callable:
    from ..transforms import image_transform

    return image_transform(model.config.vision.image_size)


def classify(model: torch.nn.Module, images: Sequence, labels: Sequence, templates="imagenet",
             preprocess: Callable | None = None, top_k: int = 5, batch_size: int = 32,
             device: str | torch.device | None = None, precision: str = "fp32",
             num_workers: int = 0, progress: bool = False) -> list[dict]:
    """Zero-shot labels for images (paths or PIL images), like transformers' pipeline.

    Returns per image ``{"image": ..., "predictions": [{"label", "score"}, ...]}`` with the
    ``top_k`` softmax probabilities (``logit_scale * cosine`` over ``labels``), best first, or
    ``{"image": ..., "error": reason}`` for an image that could not be read. ``progress``: bars
    (on stderr, when it is a terminal) for the prompts and the images.
    """
    classifier = zero_shot_classifier(model, labels, templates, device=device, precision=precision,
                                      progress=progress)
    features = encode_images(model, list(images), preprocess or _default_preprocess(model), batch_size,
                             num_workers, device, precision, progress=progress)
    results = [{"image": str(image) if isinstance(image, (str, os.PathLike)) else index}
               for index, image in enumerate(images)]
    # The loader runs in order, so skipped images come in ascending position.
    unread = sorted(set(range(len(images))) - set(features.indices.tolist()))
    for index, (_, reason) in zip(unread, features.skipped):
        results[index]["error"] = reason
    if len(features.indices):
        logits = zero_shot_logits(features.features, classifier, logit_scale_of(model))  # (N, C)
        require_finite(logits, "scores")
        probs = logits.softmax(dim=-1)
        top = probs.topk(min(top_k, len(labels)), dim=-1)  # (N, k)
        for row, index in enumerate(features.indices.tolist()):
            results[index]["predictions"] = [
                {"label": class_synonyms(labels[c])[0], "score": float(p)}
                for p, c in zip(top.values[row].tolist(), top.indices[row].tolist())
            ]
    return results


@dataclass
class ZeroShotResult:
    """Scores and metrics of a zero-shot evaluation; ``to_report()`` gives the JSON form."""

    classes: list[str]  # the data's class labels (folder names / CSV labels)
    classnames: list  # the names put into the prompts
    num_templates: int
    logits: torch.Tensor  # (M, C) logit_scale * cosine for the readable images
    indices: torch.Tensor  # (M,) position of each row's image in the data
    targets: torch.Tensor  # (M,) true labels
    metrics: dict[str, float]
    confusion: torch.Tensor  # (C, C) rows = true class
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_report(self) -> dict:
        recall, support = per_class_recall(self.logits.argmax(-1), self.targets, len(self.classes))
        return {
            "metrics": self.metrics,
            "num_images": len(self.targets),
            "num_classes": len(self.classes),
            "num_templates": self.num_templates,
            "per_class": [
                {"class": c, "name": class_synonyms(n)[0], "recall": None if s == 0 else float(r), "support": int(s)}
                for c, n, r, s in zip(self.classes, self.classnames, recall.tolist(), support.tolist())
            ],
            "confusion_matrix": self.confusion.tolist(),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def evaluate_zeroshot(model: torch.nn.Module, data: ClassificationData, classnames=None, templates="imagenet",
                      preprocess: Callable | None = None, batch_size: int = 64, num_workers: int = 0,
                      device: str | torch.device | None = None, precision: str = "fp32",
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ZeroShotResult:
    """Top-1, top-5 (with at least 5 classes) and mean per-class recall of zero-shot predictions.

    ``classnames`` as in :func:`resolve_classnames`, ``templates`` as in :func:`resolve_templates`.
    Unreadable images are skipped and listed in ``skipped``; none readable, or a single class,
    raises ``ValueError``.
    """
    names = resolve_classnames(classnames, data.classes)
    if len(names) < 2:  # one prompt wins every image: 100% that measures nothing
        raise ValueError(f"{data.source}: one class ({data.classes[0]!r}); zero-shot classification needs at least "
                         "two (is it the folder above the class folders?)")
    template_list = resolve_templates(templates)
    classifier = zero_shot_classifier(model, names, template_list, device=device, precision=precision,
                                      cache_dir=cache_dir, progress=progress)
    features = encode_images(model, data.paths, preprocess or _default_preprocess(model), batch_size,
                             num_workers, device, precision, cache_dir, progress)
    if len(features.indices) == 0:
        raise ValueError(f"{data.source}: none of the {len(data.paths)} images could be read, "
                         f"e.g. {features.skipped[0][0]} ({features.skipped[0][1]})")
    logits = zero_shot_logits(features.features, classifier, logit_scale_of(model)).cpu()  # (M, C)
    require_finite(logits, "scores")
    targets = torch.tensor(data.labels)[features.indices]  # (M,)
    accuracy = topk_accuracy(logits, targets, ks=(1, 5))
    predictions = logits.argmax(dim=-1)
    metrics = {f"top{k}": value for k, value in accuracy.items()}
    metrics["mean_per_class_recall"] = mean_per_class_recall(predictions, targets, len(names))
    return ZeroShotResult(
        classes=list(data.classes), classnames=names, num_templates=len(template_list), logits=logits,
        indices=features.indices, targets=targets, metrics=metrics,
        confusion=confusion_matrix(predictions, targets, len(names)), skipped=features.skipped,
    )
